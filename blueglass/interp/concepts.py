"""Concept recovery: does a single SAE latent separate tokens of objects with a given concept value?

For every value of every concept column (toy world: colour, shape, size), among tokens whose concept is
known, the AUROC of each latent's activation at telling "this value" from "another value"; the best latent
per value, and the mean best-AUROC per concept family. Computed from ranks, one pass per value, without
materialising anything larger than the codes themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _column_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of every column of ``x`` ``[n, m]``."""
    n, m = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    ranks = np.empty_like(x, dtype=np.float64)
    sorted_x = np.take_along_axis(x, order, 0)
    base = np.arange(1, n + 1, dtype=np.float64)[:, None].repeat(m, 1)
    # average ties: within runs of equal sorted values, replace each rank by the run mean
    new_run = np.vstack([np.ones((1, m), bool), sorted_x[1:] != sorted_x[:-1]])
    run_id = np.cumsum(new_run, axis=0)
    for j in range(m):
        ids = run_id[:, j]
        sums = np.bincount(ids, weights=base[:, j])
        counts = np.bincount(ids)
        base[:, j] = (sums / np.maximum(counts, 1))[ids]
    np.put_along_axis(ranks, order, base, 0)
    return ranks


def best_latent_auroc(
    codes: np.ndarray, meta: np.ndarray, concepts: Mapping[str, Sequence[str]]
) -> dict[str, dict]:
    """``{concept: {"values": {value: {"auroc", "latent"}}, "mean_best_auroc": float}}``."""
    out: dict[str, dict] = {}
    for concept, vocab in concepts.items():
        if concept not in meta.dtype.names:
            continue
        known = meta[concept] >= 0
        if known.sum() < 10:
            continue
        labels = meta[concept][known]
        ranks = _column_ranks(codes[known].astype(np.float64))
        values = {}
        for v_idx, value in enumerate(vocab):
            pos = labels == v_idx
            n_pos, n_neg = int(pos.sum()), int((~pos).sum())
            if n_pos == 0 or n_neg == 0:
                continue
            auc = (ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            best = int(np.argmax(auc))
            values[value] = {"auroc": float(auc[best]), "latent": best}
        if values:
            out[concept] = {
                "values": values,
                "mean_best_auroc": float(np.mean([v["auroc"] for v in values.values()])),
            }
    return out
