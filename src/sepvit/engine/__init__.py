"""The training engine every task shares (classification, detection, segmentation).

``config`` typed run configurations; ``loop`` the :class:`~sepvit.engine.loop.Task` interface and
the :class:`~sepvit.engine.loop.Trainer`; ``checkpoint`` weights files and resumable checkpoint
sets; ``data`` image opening, seeding, sampling; ``optim`` optimizer, schedule, mixed precision;
``reporting`` progress, CSV, TensorBoard, plots; ``distributed`` torchrun; ``files`` atomic writes;
``run`` one run from a command line.
"""
