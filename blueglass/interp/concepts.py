"""Concept recovery: does a single SAE latent separate tokens of objects with a given concept value?

For every value of every concept column (toy world: colour, shape, size), among tokens whose concept is
known, the AUROC of each latent's activation at telling "this value" from "another value"; the best latent
per value, and the mean best-AUROC per concept family. Computed from ranks, one pass per value, without
materialising anything larger than the codes themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from blueglass.interp.ranks import auroc_from_ranks, average_ranks


def best_latent_auroc(
    codes: np.ndarray, meta: np.ndarray, concepts: Mapping[str, Sequence[str]], top: int = 5
) -> dict[str, dict]:
    """``{concept: {"values": {value: {"auroc", "latent", "top"}}, "mean_best_auroc": float}}``."""
    out: dict[str, dict] = {}
    for concept, vocab in concepts.items():
        if concept not in meta.dtype.names:
            continue
        known = meta[concept] >= 0
        if known.sum() < 10:
            continue
        labels = meta[concept][known]
        sub = codes[known]
        ranks = np.column_stack([average_ranks(sub[:, j]) for j in range(sub.shape[1])])
        values = {}
        for v_idx, value in enumerate(vocab):
            pos = labels == v_idx
            n_pos, n_neg = int(pos.sum()), int((~pos).sum())
            if n_pos == 0 or n_neg == 0:
                continue
            auc = auroc_from_ranks(ranks, pos)
            order = np.argsort(-auc, kind="stable")[:top]
            values[value] = {
                "auroc": float(auc[order[0]]),
                "latent": int(order[0]),
                "top": [[int(j), float(auc[j])] for j in order],  # the `top` best latents, best first
            }
        if values:
            out[concept] = {
                "values": values,
                "mean_best_auroc": float(np.mean([v["auroc"] for v in values.values()])),
            }
    return out
