"""Image classification: its typed options and presets, data, models, the engine task, evaluation
and prediction (``sepvit classify train|eval|predict``)."""
