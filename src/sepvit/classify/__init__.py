"""Training, evaluation and prediction: ``sepvit train|demo|eval|predict``."""
