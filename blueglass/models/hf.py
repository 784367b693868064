"""The common base of the Hugging Face transformers adapters (one subclass module per family).

A folder is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors``, plus the image
processor / tokenizer a real checkpoint ships). The model class is the public transformers class named in
``config.json``'s ``architectures``; it is loaded with ``local_files_only=True`` — nothing is downloaded.

Hook points come from one traced forward pass (two blank images, so outputs that are not per image are
left out). Each family declares token layouts by module-path glob (``layout_rules``); points it does not
name get one from their output shape: ``[C, H, W]`` maps are patch grids, ``[1 + g², d]`` / ``[g², d]``
sequences on the vision grid are CLS+patches / patches, ``[d]`` is pooled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blueglass.errors import ModelError
from blueglass.models.base import Fit, HookPoint, TokenLayout, glob_match, trace_hook_points, weights_sha256
from blueglass.models.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdapterOptions,
    ClassBinding,
    SquareInput,
    decode_dense,
    processor_settings,
    require_folder,
)


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder}: no readable config.json ({exc.__class__.__name__})") from None


def model_class(folder: Path, allowed: Sequence[str]):
    """The transformers class named by the folder's ``architectures`` (must be one of ``allowed``)."""
    import transformers

    archs = read_config(folder).get("architectures") or []
    arch = next((a for a in archs if a in allowed), None)
    if arch is None:
        raise ModelError(f"{folder}: architectures {archs} is none of {', '.join(allowed)}")
    return getattr(transformers, arch)


def load_pretrained(cls, folder: Path):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(f"{folder}: cannot load {cls.__name__} ({first})") from None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{folder}: this model needs its tokenizer saved in the folder ({str(exc).splitlines()[0]})"
        ) from None


# DETR-style decoders: every output of the decoder stack is one token per object query
DECODER_QUERIES: tuple[tuple[str, str], ...] = (
    ("model.decoder.layers.*", "queries"),
    ("model.decoder.layernorm", "queries"),
    ("model.decoder.layer_norm", "queries"),
    ("model.decoder", "queries"),
)


class HFAdapter:
    """Base class: loading, input pipeline, hook points, token layouts, aliases, random-init control."""

    task = "embedding"
    architectures: tuple[str, ...] = ()
    default_fit: Fit = "stretch"
    default_mean: Sequence[float] = IMAGENET_MEAN
    default_std: Sequence[float] = IMAGENET_STD
    default_nms_iou = 0.5
    # (module-path glob, layout kind) — kinds: vision (CLS + patch grid), patches, queries, text, pooled, other
    layout_rules: tuple[tuple[str, str], ...] = ()
    # alias prefix → candidate ModuleList paths (the first present one is used): resid.N etc.
    alias_lists: Mapping[str, Sequence[str]] = {}

    def __init__(
        self,
        folder: str | Path,
        device: torch.device | str = "cpu",
        options: Mapping[str, Any] | AdapterOptions | None = None,
    ):
        self.folder = require_folder(folder, "save_pretrained folder (config.json + model.safetensors)")
        self.options = AdapterOptions.make(options)
        self.device = torch.device(device)
        self.module = load_pretrained(model_class(self.folder, self.architectures), self.folder)
        self.module.eval().to(self.device)
        self.name = getattr(self.module.config, "blueglass_name", None) or self.folder.name
        ps = processor_settings(self.folder, self.config_image_size(), self.default_mean, self.default_std)
        self.image_size = int(self.options.image_size or ps["size"] or 224)
        self.input = SquareInput(self.image_size, ps["mean"], ps["std"], self.options.fit or self.default_fit)
        self.nms_iou = self.options.nms_iou if self.options.nms_iou is not None else self.default_nms_iou
        self.binding = ClassBinding()
        self._categories: dict[int, str] | None = None
        self._points: list[HookPoint] | None = None

    # ------------------------------------------------------------ per-family hooks
    def config_image_size(self) -> int | None:
        """The input side the model config implies when no image processor is saved."""
        cfg = getattr(self.module.config, "vision_config", self.module.config)
        return getattr(cfg, "image_size", None)

    @property
    def patch_grid(self) -> int | None:
        cfg = getattr(self.module.config, "vision_config", self.module.config)
        patch = getattr(cfg, "patch_size", None)
        return self.image_size // patch if patch else None

    def bind_classes(self, categories: Mapping[int, str]) -> ClassBinding:
        """The binding of this model's label space to ``categories`` (families override)."""
        return ClassBinding.direct(categories)

    # ------------------------------------------------------------ the protocol
    @property
    def weights_sha256(self) -> str:
        return weights_sha256(self.folder)

    def set_classes(self, categories: Mapping[int, str]) -> None:
        """Bind the dataset's categories (id → name): prompts for text-prompted models, a label map otherwise."""
        self._categories = dict(categories)
        self.binding = self.bind_classes(self._categories)

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.input(images, self.device)}

    def _trace(self) -> None:
        if self.binding.matcher is None and self.task in ("detection", "classification", "zero_shot"):
            self.set_classes(self._categories or {1: "object"})
        blank = [np.zeros((self.image_size, self.image_size, 3), np.uint8)] * 2
        self._points = trace_hook_points(self.module, lambda: self.forward(self.preprocess(blank)), batch=2)

    def hook_points(self) -> list[HookPoint]:
        if self._points is None:
            self._trace()
        return list(self._points or [])

    def point_layout(self, name: str) -> TokenLayout | None:
        """The declared token layout of a hook point (``None``: infer from the token count)."""
        shapes = {p.name: p.shape for p in self.hook_points()}
        shape = shapes.get(name)
        kind = next((k for pat, k in self.layout_rules if glob_match(name, pat)), None)
        if kind is None:
            kind = self._kind_from_shape(shape)
        return self.make_layout(kind, name, shape)

    def _kind_from_shape(self, shape: tuple[int, ...] | None) -> str | None:
        g = self.patch_grid
        if shape is None:
            return None
        if len(shape) == 3:
            return "map"
        if len(shape) == 1:
            return "pooled"
        if len(shape) == 2 and g and shape[0] in (g * g, g * g + 1):
            return "vision" if shape[0] == g * g + 1 else "patches"
        return None

    def make_layout(self, kind: str | None, name: str, shape: tuple[int, ...] | None) -> TokenLayout | None:
        fit = self.input.fit
        g = self.patch_grid or 0
        if kind == "vision":
            return TokenLayout("patches", g, g, prefix=1, fit=fit)
        if kind == "patches":
            return TokenLayout("patches", g, g, fit=fit)
        if kind == "map" and shape is not None and len(shape) == 3:
            return TokenLayout("patches", shape[1], shape[2], fit=fit)
        if kind in ("queries", "text", "pooled", "other"):
            return TokenLayout(kind)  # type: ignore[arg-type]
        return None

    def aliases(self) -> dict[str, str]:
        modules = dict(self.module.named_modules())
        out: dict[str, str] = {}
        for alias, candidates in self.alias_lists.items():
            path = next((c for c in candidates if c in modules), None)
            if path is not None:
                n = len(modules[path])
                out.update({f"{alias}.{i}": f"{path}.{i}" for i in range(n)})
                out[f"{alias}.last"] = f"{path}.{n - 1}"  # the same name for any depth
        return out

    def reinitialize(self, seed: int) -> None:
        """Replace the weights by a fresh random initialisation (the control for probes and SAEs)."""
        torch.manual_seed(seed)
        self.module = type(self.module)(self.module.config).eval().to(self.device)
        self.name = f"{self.name}-random"
        self.control_seed = seed
        self._points = None
        if self._categories is not None:
            self.set_classes(self._categories)

    # ------------------------------------------------------------ text-prompted families
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised text embeddings from the model's own text encoder (families with one override)."""
        raise NotImplementedError

    def bind_prompts(self, categories: Mapping[int, str], default_template: str) -> ClassBinding:
        """Prompts from the dataset's category names (or ``vocabulary``), encoded by ``set_prompts``.

        With a ``vocabulary`` the prompts are not the dataset's classes: they are matched to them by the
        model's own text embeddings (:class:`~blueglass.evaluation.label_matching.LabelMatcher`).
        """
        ids = sorted(categories)
        prompts = self.options.prompts([categories[k] for k in ids], default_template)
        self.set_prompts(prompts)
        if self.options.vocabulary is None:
            binding = ClassBinding.direct(categories)
            binding.source = prompts
            return binding
        return ClassBinding.bind(self.options.vocabulary, categories, self.options, embed=self.embed_texts)

    def set_prompts(self, prompts: Sequence[str]) -> None:
        raise NotImplementedError


class HFDetector(HFAdapter):
    """Detectors with one prediction per token (query or patch): ``_probs_boxes`` gives per-token
    dataset-class probabilities and normalised xyxy boxes; decoding is shared."""

    task = "detection"

    def _probs_boxes(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, outputs, sizes):
        probs, boxes = self._probs_boxes(outputs)
        return decode_dense(
            probs,
            boxes,
            sizes,
            self.input.image_scale(sizes),
            self.binding.require().category_ids,
            score_threshold=self.options.score_threshold,
            nms_iou=self.nms_iou,
            max_detections=self.options.max_detections,
        )

    def postprocess(self, outputs, sizes):
        return self._decode(outputs, sizes)[0]

    def token_predictions(self, outputs, detections, sizes):
        """Every token's own prediction (best dataset class, its score and box) and whether it was kept."""
        return self._decode(outputs, sizes)[1]


class SetDetector(HFDetector):
    """DETR-style set prediction (one box per object query): letterboxed input (default side 800, the
    reference processors' shortest edge), no NMS."""

    default_fit = "letterbox"
    default_nms_iou = 1.0

    def config_image_size(self) -> int:
        return 800
