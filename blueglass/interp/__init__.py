"""Interpretability models trained on Lens datasets: sparse autoencoders (and, next, linear probes)."""
