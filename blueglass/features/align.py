"""Per-token metadata (the aligner): what each recorded token is and what it saw.

Columns (one structured numpy record per token; ``-1`` / ``0`` where a field does not apply):

* ``image_id``, ``token_id`` (index within the point's tokens), ``token_kind`` (0 CLS, 1 patch, 2 query,
  3 other), ``row``, ``col`` (patch grid position);
* detectors — the token's own prediction ``pred_box`` (xyxy, image pixels), ``pred_class`` (category id),
  ``pred_score``; ``kept`` (it survived post-processing: the detections the benchmark scores);
  ``gt_index`` / ``gt_class`` / ``iou`` (its prediction's best-overlapping ground-truth object, any class);
  ``tp`` (greedy same-class matching of the kept detections, highest score first, at the IoU threshold);
* patch tokens — ``cover_index`` / ``cover_class``: the ground-truth object whose box holds the patch
  centre (the smallest if several);
* concepts (toy world: ``color``, ``shape``, ``size``) as indices into the manifest's vocabularies, for the
  covering object (patch tokens), the image's only object (CLS tokens of single-object images), or the
  matched object (query tokens with ``iou`` ≥ threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blueglass.data import ImageRecord

CLS, PATCH, QUERY, OTHER = 0, 1, 2, 3
KIND_NAMES = {CLS: "cls", PATCH: "patch", QUERY: "query", OTHER: "other"}

BASE_FIELDS: list[tuple] = [
    ("image_id", "<i8"),
    ("token_id", "<i4"),
    ("token_kind", "i1"),
    ("row", "<i2"),
    ("col", "<i2"),
    ("pred_box", "<f4", (4,)),
    ("pred_class", "<i4"),
    ("pred_score", "<f4"),
    ("kept", "i1"),
    ("gt_index", "<i4"),
    ("gt_class", "<i4"),
    ("iou", "<f4"),
    ("tp", "i1"),
    ("cover_index", "<i4"),
    ("cover_class", "<i4"),
]


def meta_dtype(concepts: Sequence[str]) -> np.dtype:
    return np.dtype(BASE_FIELDS + [(c, "<i2") for c in concepts])


@dataclass
class TokenPredictions:
    """A detector's per-token predictions for one image (image pixels)."""

    boxes_xyxy: np.ndarray  # [P, 4]
    scores: np.ndarray  # [P]
    labels: np.ndarray  # [P] category ids
    kept: np.ndarray  # [P] bool: survived post-processing


def token_layout(n_tokens: int, grid: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kind, row, col) per token: CLS + grid², grid² patches, a single CLS, or queries."""
    kind = np.full(n_tokens, QUERY, np.int8)
    row = np.full(n_tokens, -1, np.int16)
    col = np.full(n_tokens, -1, np.int16)
    if grid and n_tokens in (grid * grid, grid * grid + 1):
        off = n_tokens - grid * grid
        if off:
            kind[0] = CLS
        kind[off:] = PATCH
        idx = np.arange(grid * grid)
        row[off:], col[off:] = idx // grid, idx % grid
    elif n_tokens == 1:
        kind[0] = CLS
    return kind, row, col


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of xyxy boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return (inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)).astype(np.float32)


def greedy_tp(
    pred: TokenPredictions, gt_boxes: np.ndarray, gt_classes: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """COCO-style matching: kept predictions by descending score each take the best unmatched GT of their class."""
    tp = np.zeros(len(pred.scores), np.int8)
    ious = box_iou(pred.boxes_xyxy, gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    for p in np.argsort(-pred.scores, kind="stable"):
        if not pred.kept[p]:
            continue
        cand = np.where((gt_classes == pred.labels[p]) & ~taken, ious[p], -1.0)
        if len(cand) and cand.max() >= iou_threshold:
            g = int(cand.argmax())
            taken[g] = True
            tp[p] = 1
    return tp


def image_metadata(
    record: ImageRecord,
    n_tokens: int,
    grid: int | None,
    concepts: dict[str, list[str]],
    preds: TokenPredictions | None = None,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """The metadata records of one image's tokens at one point."""
    meta = np.zeros(n_tokens, meta_dtype(list(concepts)))
    kind, row, col = token_layout(n_tokens, grid)
    meta["image_id"] = record.id
    meta["token_id"] = np.arange(n_tokens)
    meta["token_kind"], meta["row"], meta["col"] = kind, row, col
    for f in ("pred_class", "gt_index", "gt_class", "cover_index", "cover_class", *concepts):
        meta[f] = -1
    anns = record.annotations
    gt_boxes = np.array([a.xyxy for a in anns], np.float32).reshape(-1, 4)
    gt_classes = np.array([a.category_id for a in anns], np.int64)
    concept_idx = np.array(
        [
            [
                concepts[c].index(a.attributes[c]) if a.attributes.get(c) in concepts[c] else -1
                for c in concepts
            ]
            for a in anns
        ],
        np.int16,
    ).reshape(len(anns), len(concepts))

    def set_concepts(tokens: np.ndarray, objects: np.ndarray) -> None:
        ok = objects >= 0
        for j, c in enumerate(concepts):
            meta[c][tokens[ok]] = concept_idx[objects[ok], j]

    # patch tokens: the object covering the patch centre
    patches = np.flatnonzero(kind == PATCH)
    if grid and len(patches) and len(anns):
        cx = (col[patches] + 0.5) * record.width / grid
        cy = (row[patches] + 0.5) * record.height / grid
        inside = (
            (cx[:, None] >= gt_boxes[None, :, 0])
            & (cx[:, None] < gt_boxes[None, :, 2])
            & (cy[:, None] >= gt_boxes[None, :, 1])
            & (cy[:, None] < gt_boxes[None, :, 3])
        )
        area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        cover = np.where(inside, area[None, :], np.inf).argmin(1)
        cover[~inside.any(1)] = -1
        meta["cover_index"][patches] = cover
        meta["cover_class"][patches] = np.where(cover >= 0, gt_classes[cover.clip(0)], -1)
        set_concepts(patches, cover)
    cls_tokens = np.flatnonzero(kind == CLS)
    if len(anns) == 1 and len(cls_tokens):
        set_concepts(cls_tokens, np.zeros(len(cls_tokens), np.int64))

    # prediction tokens: the detector's predictions belong to the patch (or query) tokens, in order
    if preds is not None:
        pred_tokens = patches if len(patches) == len(preds.scores) else np.flatnonzero(kind != CLS)
        if len(pred_tokens) == len(preds.scores):
            meta["pred_box"][pred_tokens] = preds.boxes_xyxy
            meta["pred_score"][pred_tokens] = preds.scores
            meta["pred_class"][pred_tokens] = preds.labels
            meta["kept"][pred_tokens] = preds.kept
            if len(anns):
                ious = box_iou(preds.boxes_xyxy, gt_boxes)
                best = ious.argmax(1)
                meta["gt_index"][pred_tokens] = best
                meta["gt_class"][pred_tokens] = gt_classes[best]
                meta["iou"][pred_tokens] = ious[np.arange(len(best)), best]
                meta["tp"][pred_tokens] = greedy_tp(preds, gt_boxes, gt_classes, iou_threshold)
                queries = pred_tokens[kind[pred_tokens] == QUERY]
                if len(queries):
                    matched = np.where(meta["iou"][queries] >= iou_threshold, meta["gt_index"][queries], -1)
                    set_concepts(queries, matched)
    return meta
