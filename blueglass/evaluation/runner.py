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
    ``<family>.accuracy`` on the split's single-object images. Classification (a model with its own label
    space, matched to the dataset's categories): ``accuracy`` on single-object images (an ImageFolder
    dataset has one whole-image object per image). Embedding (a backbone without a head): nearest class
    centroid ``accuracy`` of its pooled embedding, centroids from half the images (seeded), scored on the
    other half.
    """
    bind_classes(adapter, ds)
    if adapter.task in ("classification", "embedding"):
        return _evaluate_classes(adapter, ds, batch_size, tick)
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
    emb = _forward_records(adapter, ds, records, batch_size, tick)
    metrics: dict[str, Any] = {"images": len(records)}
    if emb is None:
        metrics["accuracy"] = None
        return metrics
    accs = []
    for fam in families:
        adapter.set_prompts(fam.prompts)
        labels = np.array([fam.label(image_values(ds, r)) for r in records])
        acc = zero_shot_accuracy(adapter.postprocess(emb), labels)
        metrics[fam.name] = {"accuracy": acc, "classes": len(fam.classes)}
        accs.append(acc)
    metrics["accuracy"] = float(np.mean(accs))
    return metrics


def bind_classes(adapter: ModelAdapter, ds: CocoDataset) -> None:
    """Give an adapter with its own label space (or text prompts) the dataset's categories."""
    bind = getattr(adapter, "set_classes", None)
    if bind is not None:
        bind(ds.categories)


def _forward_records(
    adapter: ModelAdapter, ds: CocoDataset, records, batch_size: int, tick
) -> torch.Tensor | None:
    """The model's raw outputs for ``records`` (one tensor per image, concatenated); ticks every image of ``ds``."""
    outs = []
    for sl in _batches(len(records), batch_size):
        recs = records[sl]
        outs.append(adapter.forward(adapter.preprocess([ds.load_image(r) for r in recs])))
        if tick:
            tick(len(recs))
    if tick and len(records) < len(ds):
        tick(len(ds) - len(records))
    return torch.cat(outs) if outs else None


def _evaluate_classes(adapter: ModelAdapter, ds: CocoDataset, batch_size: int, tick) -> dict[str, Any]:
    ids = sorted(ds.categories)
    records = [r for r in ds.images if len(r.annotations) == 1]
    raw = _forward_records(adapter, ds, records, batch_size, tick)
    metrics: dict[str, Any] = {"images": len(records)}
    if raw is None:
        metrics["accuracy"] = None
        return metrics
    labels = np.array([ids.index(r.annotations[0].category_id) for r in records])
    out = adapter.postprocess(raw).float()
    if adapter.task == "classification":
        metrics["accuracy"] = zero_shot_accuracy(out, labels)
        k = min(5, out.shape[1])
        topk = out.topk(k, dim=-1).indices.numpy()
        metrics[f"top{k}_accuracy"] = float((topk == labels[:, None]).any(1).mean())
        return metrics
    metrics.update(nearest_centroid_accuracy(out.numpy(), labels))
    return metrics


def nearest_centroid_accuracy(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Cosine nearest-class-centroid accuracy: centroids from a seeded half of the images, scored on the rest."""
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    order = np.random.default_rng(seed).permutation(len(labels))
    fit, test = order[: len(order) // 2], order[len(order) // 2 :]
    classes = np.unique(labels[fit])
    if len(test) == 0 or len(classes) == 0:
        return {"accuracy": None, "method": "nearest_centroid"}
    cent = np.stack([emb[fit][labels[fit] == c].mean(0) for c in classes])
    pred = classes[(emb[test] @ cent.T).argmax(1)]
    return {
        "accuracy": float((pred == labels[test]).mean()),
        "method": "nearest_centroid",
        "scored": len(test),
    }


HEADLINE = {
    "detection": "AP50",
    "zero_shot": "accuracy",
    "classification": "accuracy",
    "embedding": "accuracy",
}


def headline_metrics(task: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The flat metrics worth a registry tag: detection AP family; zero-shot accuracy per family."""
    if task == "detection":
        return {k: metrics[k] for k in ("AP", "AP50", "AP75", "AR100") if metrics.get(k) is not None}
    out = {"accuracy": metrics["accuracy"]} if metrics.get("accuracy") is not None else {}
    for k, v in metrics.items():
        if isinstance(v, dict) and "accuracy" in v:
            out[f"accuracy.{k}"] = v["accuracy"]
    return out
