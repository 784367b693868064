"""Run a model over a dataset split and score it: the one evaluation loop every stage shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from blueglass.data import CocoDataset
from blueglass.evaluation.classification import image_values, prompt_families, zero_shot_accuracy
from blueglass.evaluation.detection import evaluate_detections
from blueglass.models.base import ModelAdapter


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def evaluate(
    adapter: ModelAdapter,
    ds: CocoDataset,
    *,
    batch_size: int = 64,
    prompts: Mapping[str, str] | None = None,
    tick: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Task metrics of ``adapter`` on ``ds``.

    Detection: COCO ``AP, AP50, …, per_class``. Zero-shot: ``accuracy`` (mean over prompt families) and
    ``<family>.accuracy`` on the split's single-object images.
    """
    if adapter.task == "detection":
        preds = {}
        for sl in _batches(len(ds), batch_size):
            recs = ds.images[sl]
            out = adapter.forward(adapter.preprocess([ds.load_image(r) for r in recs]))
            dets = adapter.postprocess(out, [(r.height, r.width) for r in recs])
            preds.update({r.id: d for r, d in zip(recs, dets, strict=True)})
            if tick:
                tick(len(recs))
        metrics = evaluate_detections(ds.coco_dict(), preds)
        metrics["images"] = len(ds)
        return metrics

    families = prompt_families(ds, dict(prompts or {}))
    records = [r for r in ds.images if image_values(ds, r) is not None]
    embeds = []
    for sl in _batches(len(records), batch_size):
        recs = records[sl]
        embeds.append(adapter.forward(adapter.preprocess([ds.load_image(r) for r in recs])))
        if tick:
            tick(len(recs))
    if tick and len(records) < len(ds):
        tick(len(ds) - len(records))
    metrics: dict[str, Any] = {"images": len(records)}
    if not records:
        metrics["accuracy"] = None
        return metrics
    emb = torch.cat(embeds)
    accs = []
    for fam in families:
        adapter.set_prompts(fam.prompts)
        labels = np.array([fam.label(image_values(ds, r)) for r in records])
        acc = zero_shot_accuracy(adapter.postprocess(emb), labels)
        metrics[fam.name] = {"accuracy": acc, "classes": len(fam.classes)}
        accs.append(acc)
    metrics["accuracy"] = float(np.mean(accs))
    return metrics


HEADLINE = {"detection": "AP50", "zero_shot": "accuracy"}


def headline_metrics(task: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The flat metrics worth a registry tag: detection AP family; zero-shot accuracy per family."""
    if task == "detection":
        return {k: metrics[k] for k in ("AP", "AP50", "AP75", "AR100") if metrics.get(k) is not None}
    out = {"accuracy": metrics["accuracy"]} if metrics.get("accuracy") is not None else {}
    for k, v in metrics.items():
        if isinstance(v, dict) and "accuracy" in v:
            out[f"accuracy.{k}"] = v["accuracy"]
    return out
