"""Open-vocabulary label matching: map a model's own label space onto a dataset's classes.

A model may name its classes differently from the dataset (``tvmonitor`` vs ``tv``), score arbitrary
text prompts (OWL-ViT, Grounding DINO, CLIP) or output free-text labels. :class:`LabelMatcher` maps each
*source* label (model class name or prompt) to dataset classes by cosine similarity of normalised text
embeddings:

* exact matches after normalisation (case, ``_``/``-``, spaces, a leading ``a photo of a``…) get similarity 1;
* the rest use an embedding function — the model's own text encoder when it has one, else
  :func:`ngram_embed` (character trigram hashing, no download, good for spelling variants only);
* a source keeps its ``top_k`` most similar dataset classes whose similarity is at least
  ``oov_threshold``; one with none is *out of vocabulary* and its predictions are dropped;
* ``score_scaling``: ``none`` keeps a prediction's score, ``similarity`` multiplies it by the match
  similarity (so doubtful matches rank lower in COCO AP).

The result is a ``[sources, classes]`` weight matrix: ``map_scores`` turns per-source scores into per-class
scores (max over sources), ``map_labels`` turns source label indices into dataset category ids.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ScoreScaling = Literal["none", "similarity"]
_PREFIX = re.compile(r"^(a |an |the )?(photo|picture|image) of (a |an |the )?")


def normalise_label(text: str) -> str:
    """Lower case, ``_``/``-`` → space, collapsed spaces, prompt boilerplate and trailing dots removed."""
    t = re.sub(r"[_\-]+", " ", text.lower()).strip().rstrip(".").strip()
    t = _PREFIX.sub("", re.sub(r"\s+", " ", t))
    return t


def ngram_embed(texts: Sequence[str], dim: int = 2048) -> np.ndarray:
    """Character-trigram hashing embeddings ``[N, dim]`` (L2-normalised) of normalised labels."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        t = f"  {normalise_label(text)}  "
        for j in range(len(t) - 2):
            out[i, zlib.crc32(t[j : j + 3].encode()) % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


@dataclass
class LabelMatcher:
    weights: np.ndarray  # [S, T] mapping weights; 0 = not mapped
    similarity: np.ndarray  # [S, T] cosine similarity used for the mapping
    target_ids: np.ndarray  # [T] dataset category ids

    @classmethod
    def from_embeddings(
        cls,
        source_emb: np.ndarray,
        target_emb: np.ndarray,
        target_ids: Sequence[int],
        *,
        top_k: int = 1,
        oov_threshold: float = 0.5,
        score_scaling: ScoreScaling = "none",
    ) -> LabelMatcher:
        """Match by cosine similarity of (re-normalised) embeddings ``[S, D]`` and ``[T, D]``."""
        sim = _l2(source_emb) @ _l2(target_emb).T
        return cls._from_similarity(sim, target_ids, top_k, oov_threshold, score_scaling)

    @classmethod
    def from_labels(
        cls,
        source_labels: Sequence[str],
        target_names: Sequence[str],
        target_ids: Sequence[int],
        *,
        embed: Callable[[Sequence[str]], np.ndarray] | None = None,
        top_k: int = 1,
        oov_threshold: float = 0.5,
        score_scaling: ScoreScaling = "none",
    ) -> LabelMatcher:
        """Match label texts: exact normalised matches first, then ``embed`` (default :func:`ngram_embed`)."""
        embed = embed or ngram_embed
        src = [normalise_label(s) for s in source_labels]
        tgt = [normalise_label(t) for t in target_names]
        sim = _l2(np.asarray(embed(src))) @ _l2(np.asarray(embed(tgt))).T
        exact = np.array([[s == t for t in tgt] for s in src], bool).reshape(len(src), len(tgt))
        # an exact name match is certain and wins over every embedding neighbour
        sim = np.where(exact, 1.0, np.where(exact.any(1, keepdims=True), -1.0, np.minimum(sim, 0.999)))
        return cls._from_similarity(sim, target_ids, top_k, oov_threshold, score_scaling)

    @classmethod
    def identity(cls, target_ids: Sequence[int]) -> LabelMatcher:
        """Source i is dataset class i (prompts built from the dataset's own category names)."""
        eye = np.eye(len(target_ids), dtype=np.float32)
        return cls(eye, eye.copy(), np.asarray(target_ids, np.int64))

    @classmethod
    def _from_similarity(cls, sim, target_ids, top_k, oov_threshold, score_scaling) -> LabelMatcher:
        if score_scaling not in ("none", "similarity"):
            raise ValueError(f"score_scaling must be 'none' or 'similarity', not {score_scaling!r}")
        sim = np.asarray(sim, np.float32)
        weights = np.zeros_like(sim)
        k = max(1, min(int(top_k), sim.shape[1]))
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        for s, cols in enumerate(order):
            for t in cols:
                if sim[s, t] >= oov_threshold:
                    weights[s, t] = 1.0 if score_scaling == "none" else max(float(sim[s, t]), 0.0)
        return cls(weights, sim, np.asarray(target_ids, np.int64))

    @property
    def out_of_vocabulary(self) -> np.ndarray:
        """Indices of the source labels mapped to no dataset class."""
        return np.flatnonzero(~(self.weights > 0).any(1))

    def map_scores(self, scores: np.ndarray) -> np.ndarray:
        """Per-source scores ``[..., S]`` → per-class scores ``[..., T]`` (max over mapped sources)."""
        scores = np.asarray(scores, np.float32)
        return (scores[..., :, None] * self.weights).max(-2) if self.weights.size else scores[..., :0]

    def map_labels(self, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Source label indices + scores of N predictions → (prediction index, category id, scaled score).

        A prediction yields one entry per class its label maps to (up to ``top_k``); OOV labels none.
        """
        labels = np.asarray(labels, np.int64)
        w = self.weights[labels]  # [N, T]
        idx, t = np.nonzero(w > 0)
        return idx, self.target_ids[t], np.asarray(scores, np.float32)[idx] * w[idx, t]

    def table(self, source_labels: Sequence[str], target_names: Sequence[str]) -> dict[str, list[str]]:
        """``{source: [matched class names]}`` — what a reviewer checks in the run's artifacts."""
        return {
            s: [target_names[t] for t in np.flatnonzero(self.weights[i] > 0)]
            for i, s in enumerate(source_labels)
        }
