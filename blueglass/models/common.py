"""Pieces every real-model adapter shares (transformers and torchvision families alike).

* :class:`AdapterOptions` — the per-model settings a recipe may set (``models.<name>`` in params.yaml).
* :class:`SquareInput` — images → a fixed square model input. Every image of a run gets the same input
  size, so every hook point has one token layout (a Lens contract). ``stretch`` resizes to the square
  (what CLIP / ViT / OWL-ViT processors do); ``letterbox`` pads right/bottom to a square first and keeps
  the aspect ratio (OWLv2's processor; the faithful choice for DETR-family detectors).
* :func:`decode_dense` — per-token class scores and boxes → :class:`Detections` (best class per token,
  score threshold, class-wise NMS) plus every token's own prediction for the Lens metadata.
* :class:`ClassBinding` — ties a model's label space to a dataset's categories through
  :class:`~blueglass.evaluation.label_matching.LabelMatcher`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from blueglass.errors import ModelError
from blueglass.models.base import Detections, Fit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AdapterOptions:
    """Settings of a real model; every field has a documented default (docs/models.md)."""

    image_size: int | None = None  # model input side; None = the folder's processor / config
    fit: Fit | None = None  # None = the family's default
    score_threshold: float = 0.05
    nms_iou: float | None = None  # None = the family's default (0.5 for dense heads, none for DETRs)
    max_detections: int = 100
    prompt_template: str | None = None  # text-prompted models; None = the family's default
    vocabulary: tuple[str, ...] | None = None  # prompts other than the dataset's categories
    top_k: int = 1  # label matching
    oov_threshold: float = 0.5
    score_scaling: str = "none"

    @classmethod
    def make(cls, options: Mapping[str, Any] | AdapterOptions | None) -> AdapterOptions:
        if isinstance(options, AdapterOptions):
            return options
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ModelError(f"unknown adapter option(s) {unknown} (known: {', '.join(sorted(known))})")
        if options.get("vocabulary") is not None:
            options["vocabulary"] = tuple(options["vocabulary"])
        return cls(**options)

    def prompts(self, names: Sequence[str], default_template: str) -> list[str]:
        """Text prompts for class names: ``vocabulary`` if set, else the template applied to ``names``."""
        template = self.prompt_template or default_template
        if "{category}" not in template:
            raise ModelError(f"prompt_template {template!r} must contain {{category}}")
        return [template.format(category=n) for n in (self.vocabulary or names)]


def require_folder(folder: str | Path, what: str) -> Path:
    """The model folder, or one clear error saying what is expected there (nothing is downloaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(
            f"{folder}: model folder not found — put the {what} there (BlueGlass never downloads weights)"
        )
    return folder


@dataclass
class SquareInput:
    """``[H, W, 3]`` uint8 images → normalised ``[B, 3, size, size]`` float32."""

    size: int
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    fit: Fit = "stretch"
    normalise: bool = True

    def __call__(self, images: Sequence[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
        out = []
        for im in images:
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div_(255.0)[None]
            if self.fit == "letterbox":
                h, w = x.shape[-2:]
                s = max(h, w)
                fill = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
                canvas = fill.expand(1, 3, s, s).clone()
                canvas[..., :h, :w] = x
                x = canvas
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
            out.append(x)
        x = torch.cat(out)
        if self.normalise:
            x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        return x.to(device)

    def image_scale(self, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``[B, 4]`` factors taking normalised xyxy boxes (of the model input) to image pixels."""
        rows = []
        for h, w in sizes:
            if self.fit == "letterbox":
                h = w = max(h, w)
            rows.append([w, h, w, h])
        return torch.tensor(rows, dtype=torch.float32)


def processor_settings(folder: Path, default_size: int | None, default_mean, default_std) -> dict[str, Any]:
    """Input size and normalisation from the folder's saved image processor (``preprocessor_config.json``)."""
    import json

    cfg: dict[str, Any] = {}
    p = folder / "preprocessor_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
    size = default_size
    for key in ("crop_size", "size"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("height") or v.get("shortest_edge") or v.get("width")
        if isinstance(v, int):
            size = v
            break
    return {
        "size": size,
        "mean": tuple(cfg.get("image_mean") or default_mean),
        "std": tuple(cfg.get("image_std") or default_std),
        "from_processor": bool(cfg),
    }


def decode_dense(
    probs_BTC: torch.Tensor,
    boxes_BT4: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    scale_B4: torch.Tensor,
    category_ids: Sequence[int],
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
) -> tuple[list[Detections], list[Any]]:
    """Per-token class probabilities and normalised xyxy boxes → detections and per-token predictions.

    Each token keeps its best class; tokens above ``score_threshold`` go through class-wise NMS (skipped
    with ``nms_iou >= 1``, as set-prediction detectors need none). Boxes are clipped to the image.
    """
    from torchvision.ops import batched_nms

    from blueglass.features.align import TokenPredictions

    probs = probs_BTC.float().cpu()
    boxes = boxes_BT4.float().cpu() * scale_B4[:, None, :]
    cat_ids = torch.as_tensor(np.asarray(category_ids, np.int64))
    dets, tokens = [], []
    for i, (h, w) in enumerate(sizes):
        if probs.shape[-1]:
            score, label = probs[i].max(-1)
        else:  # no class maps to the dataset: no detections
            score = torch.zeros(probs.shape[1])
            label = torch.zeros(probs.shape[1], dtype=torch.long)
        bx = boxes[i].clone()
        bx[:, 0::2] = bx[:, 0::2].clamp(0, w)
        bx[:, 1::2] = bx[:, 1::2].clamp(0, h)
        keep = torch.nonzero(score > score_threshold).flatten()
        if nms_iou < 1:
            k = batched_nms(bx[keep], score[keep], label[keep], nms_iou)
        else:
            k = torch.argsort(score[keep], descending=True, stable=True)
        keep = keep[k[:max_detections]]
        labels = cat_ids[label] if len(cat_ids) else torch.full_like(label, -1)
        dets.append(
            Detections(
                boxes_xyxy=bx[keep].numpy().astype(np.float32),
                scores=score[keep].numpy().astype(np.float32),
                labels=labels[keep].numpy().astype(np.int64),
                token_ids=keep.numpy().astype(np.int64),
            )
        )
        kept = np.zeros(len(score), bool)
        kept[keep.numpy()] = True
        tokens.append(
            TokenPredictions(boxes_xyxy=bx.numpy(), scores=score.numpy(), labels=labels.numpy(), kept=kept)
        )
    return dets, tokens


@dataclass
class ClassBinding:
    """A model's label space (class names or prompts) bound to a dataset's categories."""

    source: list[str] = field(default_factory=list)  # model label names / prompt vocabulary
    category_ids: list[int] = field(default_factory=list)
    category_names: list[str] = field(default_factory=list)
    matcher: Any = None  # LabelMatcher

    @classmethod
    def bind(
        cls,
        source: Sequence[str],
        categories: Mapping[int, str],
        options: AdapterOptions,
        embed: Callable[[Sequence[str]], np.ndarray] | None = None,
    ) -> ClassBinding:
        from blueglass.evaluation.label_matching import LabelMatcher

        ids = sorted(categories)
        names = [categories[k] for k in ids]
        matcher = LabelMatcher.from_labels(
            list(source),
            names,
            ids,
            embed=embed,
            top_k=options.top_k,
            oov_threshold=options.oov_threshold,
            score_scaling=options.score_scaling,  # type: ignore[arg-type]
        )
        return cls(list(source), ids, names, matcher)

    @classmethod
    def direct(cls, categories: Mapping[int, str]) -> ClassBinding:
        from blueglass.evaluation.label_matching import LabelMatcher

        ids = sorted(categories)
        names = [categories[k] for k in ids]
        return cls(names, ids, names, LabelMatcher.identity(ids))

    def require(self) -> ClassBinding:
        if self.matcher is None:
            raise ModelError("the adapter has no dataset classes: call set_classes(dataset.categories) first")
        return self

    def map_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """``[..., sources]`` → ``[..., categories]`` (ordered by category id)."""
        return torch.from_numpy(self.require().matcher.map_scores(probs.float().cpu().numpy()))
