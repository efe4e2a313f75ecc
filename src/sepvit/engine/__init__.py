"""The training engine every task shares (classification, detection, segmentation): the loop,
checkpoints, data plumbing and distributed set-up; no command line and no task of its own.

``config`` typed run configurations and how their values are resolved; ``loop`` the
:class:`~sepvit.engine.loop.Task` interface and the :class:`~sepvit.engine.loop.Trainer`;
``checkpoint`` weights files and resumable checkpoint sets; ``data`` seeding and sampling;
``shards`` WebDataset shards; ``optim`` optimizer, schedule, mixed precision; ``reporting``
progress, CSV, TensorBoard, curves; ``distributed`` torchrun; ``run`` one run in this process.
"""
