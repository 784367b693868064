"""COCO box AP with faster-coco-eval (a C++ port of the reference COCOeval, not hand-written).

Metric names are stable (docs/metrics.md): ``AP, AP50, AP75, APs, APm, APl, AR100`` plus ``AP/<class>``.
COCO marks a metric undefined with -1 (e.g. ``APl`` when no object is large); those come back as ``None``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from blueglass.models.base import Detections

DETECTION_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# Positions of our metrics in COCOeval.stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...).
_STATS_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def _defined(v: float) -> float | None:
    return None if v is None or v < 0 or np.isnan(v) else float(v)


def detections_to_coco(predictions: Mapping[int, Detections]) -> list[dict[str, Any]]:
    results = []
    for image_id, det in predictions.items():
        for (x0, y0, x1, y1), s, c in zip(det.boxes_xyxy, det.scores, det.labels, strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(c),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(s),
                }
            )
    return results


def evaluate_detections(gt: dict[str, Any], predictions: Mapping[int, Detections]) -> dict[str, Any]:
    """COCO bbox metrics for ``predictions`` (image id → detections) against the COCO dict ``gt``.

    Returns ``{"AP": …, …, "per_class": {name: AP}}``; an image without an entry counts as no detections.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        results = detections_to_coco(predictions)
        if not results:
            out: dict[str, Any] = dict.fromkeys(DETECTION_METRICS, 0.0)
            out["per_class"] = {c["name"]: 0.0 for c in gt["categories"]}
            return out
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *_: None)
        ev.params.imgIds = sorted(int(im["id"]) for im in gt["images"])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    out = {name: _defined(stats[i]) for name, i in _STATS_INDEX.items()}
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M max-dets]; area "all", 100 dets.
    precision = ev.eval["precision"]
    names = {int(c["id"]): c["name"] for c in gt["categories"]}
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names[int(cat_id)]] = float(p.mean()) if p.size else None
    out["per_class"] = per_class
    return out
