"""Training of the embedded toy models (the ``train_model`` stage).

Real checkpoints are never trained here; they are loaded through their adapters. The interpretability
models trained on Lens datasets (probes, SAEs) live in ``blueglass.interp``.
"""
