"""Rank statistics shared by probes (AUROC per class) and concept recovery (AUROC per latent)."""

from __future__ import annotations

import numpy as np


def average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array; tied values share the average of their ranks."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - counts + 1 + upper) / 2.0)[inverse]


def auroc_from_ranks(ranks: np.ndarray, positive: np.ndarray) -> np.ndarray | float:
    """Mann–Whitney AUROC of every column of ``ranks`` (or of a 1-D ``ranks``) for the ``positive`` rows."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
