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
}


def load_adapter(folder: str | Path, device: str = "cpu") -> ModelAdapter:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder not found")
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: no config.json (not a saved model folder)")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except json.JSONDecodeError:
        raise ModelError(f"{cfg_path}: not valid JSON") from None
    if model_type not in ADAPTERS:
        raise ModelError(
            f"{folder}: unsupported model_type {model_type!r} (supported: {', '.join(sorted(ADAPTERS))})"
        )
    import importlib

    mod_name, cls_name = ADAPTERS[model_type].split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    return cls(folder, device=device)


__all__ = [
    "ADAPTERS",
    "Detections",
    "HookPoint",
    "ModelAdapter",
    "load_adapter",
    "match_points",
    "weights_sha256",
]
