"""Hyperparameter search over the training recipe with Ray Tune (ASHA), one Ray Train run per trial."""
