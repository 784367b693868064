"""Model adapters: one protocol (:class:`ModelAdapter`), one module per model family.

``load_adapter(folder)`` picks the adapter from the folder's ``config.json`` (``model_type``), so any
model folder can be named without saying which adapter it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from blueglass.errors import ModelError
from blueglass.models.base import Detections, HookPoint, ModelAdapter, match_points, weights_sha256

# model_type in config.json → "module:Class" (imported lazily: transformers is slow to import)
ADAPTERS: dict[str, str] = {
    "blueglass-toy-detector": "blueglass.models.detector:DetectorAdapter",
    "clip": "blueglass.models.clip:ClipAdapter",
    "torchvision": "blueglass.models.tvision:TorchvisionAdapter",
}
# transformers class in config.json's ``architectures`` → adapter (checked before model_type)
ARCHITECTURES: dict[str, str] = {
    "DetrForObjectDetection": "blueglass.models.detr:DetrAdapter",
    "ConditionalDetrForObjectDetection": "blueglass.models.detr:DetrAdapter",
    "DeformableDetrForObjectDetection": "blueglass.models.detr:DetrAdapter",
    "OwlViTForObjectDetection": "blueglass.models.owlvit:OwlAdapter",
    "Owlv2ForObjectDetection": "blueglass.models.owlvit:OwlAdapter",
    "GroundingDinoForObjectDetection": "blueglass.models.grounding_dino:GroundingDinoAdapter",
    "CLIPModel": "blueglass.models.clip:ClipAdapter",
    "SiglipModel": "blueglass.models.clip:ClipAdapter",
    "ViTForImageClassification": "blueglass.models.vit:VitAdapter",
    "ViTModel": "blueglass.models.vit:VitAdapter",
    "Dinov2Model": "blueglass.models.vit:VitAdapter",
}


def _import(target: str):
    import importlib

    mod_name, cls_name = target.split(":")
    return getattr(importlib.import_module(mod_name), cls_name)


def adapter_class(folder: str | Path):
    """The adapter class for a model folder, from ``config.json``'s ``architectures`` / ``model_type``."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(
            f"{folder}: model folder not found (BlueGlass never downloads weights: save them there)"
        )
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: no config.json (not a saved model folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise ModelError(f"{cfg_path}: not valid JSON") from None
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is not None and model_type not in ADAPTERS:
        return _import(ARCHITECTURES[arch])
    if model_type in ADAPTERS:
        return _import(ADAPTERS[model_type])
    raise ModelError(
        f"{folder}: unsupported model_type {model_type!r} / architectures {archs} (supported: "
        f"{', '.join(sorted(ADAPTERS))}; architectures: {', '.join(sorted(set(ARCHITECTURES)))})"
    )


def load_adapter(folder: str | Path, device: str = "cpu", options: dict | None = None) -> ModelAdapter:
    """Load a model folder through the adapter its ``config.json`` asks for.

    ``options`` (:class:`~blueglass.models.common.AdapterOptions` fields) go to the real-model adapters;
    the embedded toy adapters take none.
    """
    cls = adapter_class(folder)
    if options:
        return cls(Path(folder), device=device, options=options)
    return cls(Path(folder), device=device)


def open_model(params, base: Path, name: str, device: str = "cpu") -> ModelAdapter:
    """The adapter for ``models.<name>`` of a params file (toy kinds: ``models/<name>``; ``hf``: its
    ``path``; ``torchvision``: ``arch`` + ``weights``), with its options applied."""
    spec = params.models[name]
    kind = getattr(spec, "kind", None)
    if kind == "torchvision":
        from blueglass.models.tvision import TorchvisionAdapter

        return TorchvisionAdapter(
            None,
            device=device,
            options=spec.adapter_options(),
            arch=spec.arch,
            weights=base / spec.weights,
            classes=spec.classes,
            arch_kwargs=spec.arch_kwargs,
        )
    folder = model_location(params, base, name)
    if kind == "hf":
        return load_adapter(folder, device=device, options=spec.adapter_options())
    return load_adapter(folder, device=device)


def model_location(params, base: Path, name: str) -> Path:
    """Where ``models.<name>``'s weights live; a missing one is one clear error naming the place."""
    spec = params.models[name]
    kind = getattr(spec, "kind", None)
    if kind == "hf":
        path = base / spec.path
        what = "the model's save_pretrained folder (config.json, *.safetensors, processor/tokenizer files)"
    elif kind == "torchvision":
        path = base / spec.weights
        what = f"the {spec.arch} state dict (.safetensors or .pth)"
    else:
        path = base / "models" / name
        if not path.is_dir():
            raise ModelError(f"{path}: model folder not found (run `blueglass train-model {name}` first)")
        return path
    if not path.exists():
        raise ModelError(f"{path}: models.{name} expects {what} here; nothing is downloaded")
    return path


__all__ = [
    "ADAPTERS",
    "ARCHITECTURES",
    "adapter_class",
    "model_location",
    "open_model",
    "Detections",
    "HookPoint",
    "ModelAdapter",
    "load_adapter",
    "match_points",
    "weights_sha256",
]
