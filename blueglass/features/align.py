"""Per-token metadata (the aligner): what each recorded token is and what it saw.

Columns (one structured numpy record per token; ``-1`` / ``0`` where a field does not apply):

* ``image_id``, ``token_id`` (index within the point's tokens), ``token_kind`` (0 CLS, 1 patch, 2 query,
  3 other, 4 text), ``row``, ``col`` (patch grid position);
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
from blueglass.models.base import TokenLayout

CLS, PATCH, QUERY, OTHER, TEXT = 0, 1, 2, 3, 4
KIND_NAMES = {CLS: "cls", PATCH: "patch", QUERY: "query", OTHER: "other", TEXT: "text"}

Layout = tuple[np.ndarray, np.ndarray, np.ndarray]  # (kind, row, col) per token

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


def declared_layout(n_tokens: int, layout: TokenLayout) -> Layout:
    """(kind, row, col) per token from an adapter's declared :class:`TokenLayout`.

    A ``patches`` layout whose token count does not match ``prefix + rows·cols`` (e.g. a model run at
    another input size) marks every token ``other`` rather than guess positions.
    """
    kind = np.full(n_tokens, OTHER, np.int8)
    row = np.full(n_tokens, -1, np.int16)
    col = np.full(n_tokens, -1, np.int16)
    if layout.kind == "queries":
        kind[:] = QUERY
    elif layout.kind == "text":
        kind[:] = TEXT
    elif layout.kind == "pooled" and n_tokens == 1:
        kind[0] = CLS
    elif layout.kind == "patches" and n_tokens == layout.prefix + layout.rows * layout.cols:
        if layout.prefix:
            kind[0] = CLS  # further prefix tokens (registers) stay "other"
        kind[layout.prefix :] = PATCH
        idx = np.arange(layout.rows * layout.cols)
        row[layout.prefix :], col[layout.prefix :] = idx // layout.cols, idx % layout.cols
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
    kept = np.flatnonzero(pred.kept)
    ious = box_iou(pred.boxes_xyxy[kept], gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    for i in np.argsort(-pred.scores[kept], kind="stable"):
        p = kept[i]
        cand = np.where((gt_classes == pred.labels[p]) & ~taken, ious[i], -1.0)
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
    return batch_metadata(
        [record], n_tokens, grid, concepts, [preds] if preds is not None else None, iou_threshold
    )


def _pad_objects(records: Sequence[ImageRecord], concepts: dict[str, list[str]]):
    """GT boxes ``[n, G, 4]`` (NaN-padded), classes ``[n, G]`` and concept indices ``[n, G, C]`` (-1 pads)."""
    g = max([len(r.annotations) for r in records] + [1])
    boxes = np.full((len(records), g, 4), np.nan, np.float32)
    classes = np.full((len(records), g), -1, np.int64)
    cidx = np.full((len(records), g, len(concepts)), -1, np.int16)
    for i, r in enumerate(records):
        for j, a in enumerate(r.annotations):
            boxes[i, j] = a.xyxy
            classes[i, j] = a.category_id
            for k, c in enumerate(concepts):
                v = a.attributes.get(c)
                cidx[i, j, k] = concepts[c].index(v) if v in concepts[c] else -1
    return boxes, classes, cidx


def _batched_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n, P, 4]`` × ``[n, G, 4]`` → ``[n, P, G]`` IoU (NaN boxes give 0)."""
    lt = np.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = np.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clip(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clip(0).prod(-1)
    iou = inter / np.maximum(area_a[:, :, None] + area_b[:, None, :] - inter, 1e-9)
    return np.nan_to_num(iou, nan=0.0).astype(np.float32)


def batch_metadata(
    records: Sequence[ImageRecord],
    n_tokens: int,
    grid: int | None,
    concepts: dict[str, list[str]],
    preds: Sequence[TokenPredictions] | None = None,
    iou_threshold: float = 0.5,
    layout: TokenLayout | None = None,
) -> np.ndarray:
    """The metadata records of a batch of images (``len(records) · n_tokens`` rows, image-major).

    Without a declared ``layout`` the tokens are inferred from their count and the adapter's square
    ``grid`` (:func:`token_layout`).
    """
    n = len(records)
    meta = np.zeros((n, n_tokens), meta_dtype(list(concepts)))
    if layout is not None:
        kind, row, col = declared_layout(n_tokens, layout)
        rows, cols, fit = layout.rows, layout.cols, layout.fit
    else:
        kind, row, col = token_layout(n_tokens, grid)
        rows, cols, fit = grid or 0, grid or 0, "stretch"
    meta["image_id"] = np.array([r.id for r in records])[:, None]
    meta["token_id"] = np.arange(n_tokens)[None, :]
    meta["token_kind"], meta["row"], meta["col"] = kind[None], row[None], col[None]
    for f in ("pred_class", "gt_index", "gt_class", "cover_index", "cover_class", *concepts):
        meta[f] = -1
    boxes, classes, cidx = _pad_objects(records, concepts)
    n_obj = np.array([len(r.annotations) for r in records])

    def set_concepts(tokens: np.ndarray, objects: np.ndarray) -> None:
        """``objects`` ``[n, len(tokens)]``: object index per image and token (-1 = none)."""
        vals = np.take_along_axis(cidx, objects.clip(0)[..., None], axis=1)  # [n, t, C]
        vals[objects < 0] = -1
        for k, c in enumerate(concepts):
            meta[c][:, tokens] = vals[..., k]

    patches = np.flatnonzero(kind == PATCH)
    if rows and cols and len(patches):
        w = np.array([r.width for r in records], np.float32)[:, None, None]
        h = np.array([r.height for r in records], np.float32)[:, None, None]
        if fit == "letterbox":  # the image sits top-left in a square of its longer side
            w = h = np.maximum(w, h)
        cx = (col[patches][None, :, None] + 0.5) * w / cols  # [n, t, 1]
        cy = (row[patches][None, :, None] + 0.5) * h / rows
        with np.errstate(invalid="ignore"):
            inside = (
                (cx >= boxes[:, None, :, 0])
                & (cx < boxes[:, None, :, 2])
                & (cy >= boxes[:, None, :, 1])
                & (cy < boxes[:, None, :, 3])
            )  # [n, t, G]
        area = np.nan_to_num((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), nan=np.inf)
        cover = np.where(inside, area[:, None, :], np.inf).argmin(-1)
        cover[~inside.any(-1)] = -1
        meta["cover_index"][:, patches] = cover
        meta["cover_class"][:, patches] = np.where(
            cover >= 0, np.take_along_axis(classes, cover.clip(0), 1), -1
        )
        set_concepts(patches, cover)
    cls_tokens = np.flatnonzero(kind == CLS)
    if len(cls_tokens):
        single = np.where(n_obj == 1, 0, -1)[:, None].repeat(len(cls_tokens), 1)
        set_concepts(cls_tokens, single)

    if preds is not None:
        n_pred = len(preds[0].scores)
        # one prediction per patch (dense heads, OWL-ViT) or per query (DETR family)
        pred_tokens = patches if len(patches) == n_pred else np.flatnonzero(kind == QUERY)
        if len(pred_tokens) == n_pred:
            pb = np.stack([p.boxes_xyxy for p in preds]).astype(np.float32)  # [n, P, 4]
            meta["pred_box"][:, pred_tokens] = pb
            meta["pred_score"][:, pred_tokens] = np.stack([p.scores for p in preds])
            meta["pred_class"][:, pred_tokens] = np.stack([p.labels for p in preds])
            meta["kept"][:, pred_tokens] = np.stack([p.kept for p in preds])
            ious = _batched_iou(pb, boxes)  # [n, P, G]
            has_gt = n_obj > 0
            best = ious.argmax(-1)
            best_iou = np.take_along_axis(ious, best[..., None], -1)[..., 0]
            meta["gt_index"][:, pred_tokens] = np.where(has_gt[:, None], best, -1)
            meta["gt_class"][:, pred_tokens] = np.where(
                has_gt[:, None], np.take_along_axis(classes, best, 1), -1
            )
            meta["iou"][:, pred_tokens] = np.where(has_gt[:, None], best_iou, 0.0)
            for i, p in enumerate(preds):
                if n_obj[i]:
                    meta["tp"][i, pred_tokens] = greedy_tp(
                        p, boxes[i, : n_obj[i]], classes[i, : n_obj[i]], iou_threshold
                    )
            queries = pred_tokens[kind[pred_tokens] == QUERY]
            if len(queries):
                matched = np.where(meta["iou"][:, queries] >= iou_threshold, meta["gt_index"][:, queries], -1)
                set_concepts(queries, matched)
    return meta.reshape(-1)
