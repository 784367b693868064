"""torchvision models from a local state dict: classifiers (ResNet, ViT, … — anything
``torchvision.models.get_model`` builds) and detectors (Faster R-CNN, RetinaNet, FCOS, …).

``arch`` is a builder name (``resnet50``, ``vit_b_16``, ``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn``,
``fcos_resnet50_fpn``) or a public model class of ``torchvision.models`` (``VisionTransformer``, ``ResNet``)
built with ``arch_kwargs``. The model is built with ``weights=None`` (nothing downloaded) and the state dict
(``.safetensors``, or ``.pth``/``.pt`` read with ``weights_only=True``) is loaded into it.

Class names: ``classes`` if given, else the categories torchvision's weight enum for ``arch`` lists (in
the installed package: ImageNet-1k for classifiers, COCO's 91 slots for detectors); they are matched to
the dataset's categories by name (label_matching). Detectors' internal resize is pinned to the input
size, so their feature maps (``backbone.body.layerN``, ``backbone.fpn``) are one fixed grid per run;
per-region outputs (ROI heads) are not per image and are not hook points.

A folder form (``config.json`` with ``model_type: torchvision``, ``arch``, ``classes``, ``arch_kwargs``,
``weights``) lets ``blueglass points --model <folder>`` work; :func:`save_torchvision` writes one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blueglass.errors import ModelError
from blueglass.models.base import Detections, HookPoint, TokenLayout, trace_hook_points
from blueglass.models.common import AdapterOptions, ClassBinding, SquareInput

MODEL_TYPE = "torchvision"


def _build(arch: str, num_classes: int, arch_kwargs: Mapping[str, Any]) -> torch.nn.Module:
    import torchvision

    cls = getattr(torchvision.models, arch, None)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return cls(num_classes=num_classes, **arch_kwargs)
    if arch not in torchvision.models.list_models():
        raise ModelError(
            f"unknown torchvision arch {arch!r} (a torchvision.models builder such as resnet50, "
            "fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn, fcos_resnet50_fpn, or a model class)"
        )
    kw: dict[str, Any] = {"weights": None, "num_classes": num_classes, **arch_kwargs}
    if arch in torchvision.models.list_models(module=torchvision.models.detection):
        kw.setdefault("weights_backbone", None)
    return torchvision.models.get_model(arch, **kw)


def default_classes(arch: str) -> list[str] | None:
    """Category names torchvision ships for ``arch``'s weights (metadata only; nothing is downloaded)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    for w in enum:
        cats = w.meta.get("categories")
        if cats:
            return list(cats)
    return None


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(
            f"{path}: weights not found — put the torchvision state dict there (nothing is downloaded)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is one user-facing error
        raise ModelError(f"{path}: not a readable state dict ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints from torchvision's reference scripts
    return state


def save_torchvision(
    model: torch.nn.Module,
    folder: Path,
    arch: str,
    classes: Sequence[str],
    arch_kwargs: Mapping[str, Any] = (),
) -> Path:
    """Write a torchvision model as a folder: ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_type": MODEL_TYPE,
        "architectures": [type(model).__name__],
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "classes": list(classes),
        "weights": "model.safetensors",
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


class TorchvisionAdapter:
    """A torchvision classifier or detector (task from the built model: detectors return per-image dicts)."""

    def __init__(
        self,
        folder: str | Path | None = None,
        device: torch.device | str = "cpu",
        options: Mapping[str, Any] | AdapterOptions | None = None,
        *,
        arch: str | None = None,
        weights: str | Path | None = None,
        classes: Sequence[str] | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
    ):
        import torchvision

        if folder is not None:
            folder = Path(folder)
            cfg = json.loads((folder / "config.json").read_text())
            arch = arch or cfg.get("arch")
            weights = weights or folder / cfg.get("weights", "model.safetensors")
            classes = classes or cfg.get("classes")
            arch_kwargs = {**cfg.get("arch_kwargs", {}), **(arch_kwargs or {})}
        if not arch or weights is None:
            raise ModelError("a torchvision model needs 'arch' and 'weights' (a state dict file)")
        self.weights_path = Path(weights)
        self.folder = self.weights_path.parent if folder is None else Path(folder)
        self.arch = arch
        self.options = AdapterOptions.make(options)
        self.device = torch.device(device)
        self.arch_kwargs = dict(arch_kwargs or {})
        state = load_state(self.weights_path)
        self.classes = list(classes or default_classes(arch) or [])
        if not self.classes:
            raise ModelError(f"torchvision arch {arch!r}: no class names known; list them under 'classes'")
        self.module = _build(arch, len(self.classes), self.arch_kwargs)
        try:
            self.module.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(
                f"{self.weights_path}: does not fit {arch} with {len(self.classes)} classes "
                f"({str(exc).splitlines()[0]})"
            ) from None
        # detection models (built-in builders or classes) take a list of images and have a transform
        self.is_detector = arch in torchvision.models.list_models(
            module=torchvision.models.detection
        ) or hasattr(self.module, "transform")
        self.task = "detection" if self.is_detector else "classification"
        self.name = self.folder.name if folder is not None else self.weights_path.stem
        size = (
            self.options.image_size
            or self.arch_kwargs.get("image_size")
            or (800 if self.is_detector else 224)
        )
        self.image_size = int(size)
        fit = self.options.fit or ("letterbox" if self.is_detector else "stretch")
        # detectors normalise inside their transform; classifiers get ImageNet normalisation here
        self.input = SquareInput(self.image_size, fit=fit, normalise=not self.is_detector)
        self._configure()
        self.binding = ClassBinding()
        self._categories: dict[int, str] | None = None
        self._points: list[HookPoint] | None = None

    def _configure(self) -> None:
        """Pin a detector's internal resize to the input size and apply the score threshold."""
        if self.is_detector:
            t = self.module.transform
            t.min_size, t.max_size = (self.image_size,), self.image_size
            if hasattr(self.module, "score_thresh"):  # RetinaNet, FCOS
                self.module.score_thresh = self.options.score_threshold
            elif hasattr(self.module, "roi_heads"):  # Faster R-CNN
                self.module.roi_heads.score_thresh = self.options.score_threshold
        self.module.eval().to(self.device)

    @property
    def weights_sha256(self) -> str:
        h = hashlib.sha256()
        with self.weights_path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def set_classes(self, categories: Mapping[int, str]) -> None:
        self._categories = dict(categories)
        self.binding = ClassBinding.bind(self.classes, categories, self.options)

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.input(images, self.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        x = batch["pixel_values"]
        return self.module(list(x)) if self.is_detector else self.module(x)

    def postprocess(self, outputs: Any, sizes: Sequence[tuple[int, int]] = ()) -> Any:
        """Detectors: ``list[Detections]`` (dataset category ids); classifiers: ``[B, categories]`` probabilities."""
        if not self.is_detector:
            return self.binding.require().map_probs(outputs.float().softmax(-1))
        matcher = self.binding.require().matcher
        scale = self.input.image_scale(sizes) / self.image_size
        dets = []
        for i, out in enumerate(outputs):
            boxes = out["boxes"].float().cpu() * scale[i]
            h, w = sizes[i]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            idx, cat, score = matcher.map_labels(out["labels"].cpu().numpy(), out["scores"].cpu().numpy())
            order = np.argsort(-score, kind="stable")[: self.options.max_detections]
            dets.append(
                Detections(
                    boxes_xyxy=boxes.numpy()[idx[order]].astype(np.float32),
                    scores=score[order].astype(np.float32),
                    labels=cat[order].astype(np.int64),
                    token_ids=np.full(len(order), -1, np.int64),  # region proposals are not Lens tokens
                )
            )
        return dets

    def hook_points(self) -> list[HookPoint]:
        if self._points is None:
            blank = [np.zeros((self.image_size, self.image_size, 3), np.uint8)] * 2
            self._points = trace_hook_points(
                self.module, lambda: self.forward(self.preprocess(blank)), batch=2
            )
        return list(self._points)

    def point_layout(self, name: str) -> TokenLayout | None:
        shape = {p.name: p.shape for p in self.hook_points()}.get(name)
        if shape is not None and len(shape) == 3:
            return TokenLayout("patches", shape[1], shape[2], fit=self.input.fit)
        if shape is not None and len(shape) == 1:
            return TokenLayout("pooled")
        if shape is not None and len(shape) == 2 and isinstance(self.module, _vit_class()):
            g = self.image_size // self.module.patch_size
            if shape[0] == g * g + 1:
                return TokenLayout("patches", g, g, prefix=1, fit=self.input.fit)
        return None

    def aliases(self) -> dict[str, str]:
        modules = dict(self.module.named_modules())
        out = {}
        for i in range(1, 5):
            for base in (f"layer{i}", f"backbone.body.layer{i}"):
                if base in modules:
                    out[f"stage.{i}"] = base
        if "encoder.layers" in modules:
            out.update(
                {
                    f"resid.{i}": f"encoder.layers.{k}"
                    for i, k in enumerate(dict(modules["encoder.layers"].named_children()))
                }
            )
        return out

    def reinitialize(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.module = _build(self.arch, len(self.classes), self.arch_kwargs)
        self._configure()
        self.name = f"{self.name}-random"
        self.control_seed = seed
        self._points = None


def _vit_class():
    from torchvision.models import VisionTransformer

    return VisionTransformer
