"""The one seam between BlueGlass and a model: the :class:`ModelAdapter` protocol.

An adapter loads a model folder, turns images into a model batch, runs the forward pass, turns the
outputs into task predictions, and lists the model's hook points (module paths with the shape of their
output for one image). Everything downstream — benchmark, recorder, patcher — talks to models only
through this protocol and ``adapter.module`` (a plain ``torch.nn.Module``).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

Task = Literal["detection", "zero_shot", "classification", "embedding"]
Fit = Literal["stretch", "letterbox"]


@dataclass(frozen=True)
class HookPoint:
    """A module whose output can be recorded or patched."""

    name: str  # module path, e.g. "vit.layers.2"
    module_type: str  # class name, e.g. "ViTLayer"
    shape: tuple[int, ...]  # output shape for one image (first tensor of a tuple output)


@dataclass(frozen=True)
class TokenLayout:
    """What the tokens of one hook point are (declared by an adapter for each point it knows).

    ``patches``: ``prefix`` leading tokens (CLS first, then registers / distillation tokens) followed by
    a ``rows × cols`` patch grid (row-major); conv maps ``[C, H, W]`` are laid out the same way.
    ``queries``: one token per object query. ``text``: one token per text token (prompt order).
    ``pooled``: one token per image. ``fit`` says how the image was mapped onto the model input
    (stretched to a square, or letterboxed into one: padded right/bottom), so a patch's centre can be put
    back into image pixels.
    """

    kind: Literal["patches", "queries", "text", "pooled", "other"]
    rows: int = 0
    cols: int = 0
    prefix: int = 0
    fit: Fit = "stretch"


@dataclass
class Detections:
    """Predictions for one image, in input-image pixel coordinates."""

    boxes_xyxy: np.ndarray  # [N, 4] float32
    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int64, dataset category ids
    token_ids: np.ndarray  # [N] int64, the token that produced each detection


@runtime_checkable
class ModelAdapter(Protocol):
    name: str
    task: Task
    folder: Path
    module: nn.Module

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """``[H, W, 3]`` uint8 images → model inputs."""
        ...

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model; hooks registered on ``module`` see this pass."""
        ...

    def postprocess(self, outputs: Any, sizes: Sequence[tuple[int, int]]) -> Any:
        """Model outputs → task predictions (``list[Detections]`` or ``[B, prompts]`` logits)."""
        ...

    def hook_points(self) -> list[HookPoint]: ...


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a hook output (a tensor, a tuple/list, or a ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def trace_hook_points(module: nn.Module, run_forward: Any, batch: int | None = None) -> list[HookPoint]:
    """Run ``run_forward()`` once with a hook on every named submodule; list those that fired.

    Module paths come from the loaded model itself, never from a hard-coded list, so they stay right
    across library versions (transformers 5 moved ViT blocks from ``encoder.layer.N`` to ``layers.N``).
    With ``batch`` (the number of images ``run_forward`` feeds), outputs whose first dimension is not
    that batch — e.g. a detector's pooled region features of every image concatenated — are left out:
    they cannot be split into per-image tokens.
    """
    seen: dict[str, HookPoint] = {}
    handles = []

    def make_hook(name: str):
        def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
            t = first_tensor(out)
            if (
                t is not None
                and name not in seen
                and (batch is None or (t.ndim >= 2 and t.shape[0] == batch))
            ):
                seen[name] = HookPoint(name, type(mod).__name__, tuple(t.shape[1:]))

        return hook

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    return sorted(seen.values(), key=lambda p: order[p.name])


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in re.split(r"(\*\*|\*|\?)", pattern):
        parts.append({"**": ".*", "*": "[^.]*", "?": "[^.]"}.get(token, re.escape(token)))
    return re.compile("".join(parts) + r"\Z")


def glob_match(name: str, pattern: str) -> bool:
    """Module-path glob: ``*`` stays within one path segment, ``**`` crosses dots.

    ``vit.layers.*`` matches the blocks ``vit.layers.0`` … but not ``vit.layers.0.mlp``.
    """
    return _glob_regex(pattern).match(name) is not None


def match_points(points: Sequence[HookPoint], patterns: Sequence[str]) -> list[HookPoint]:
    """Hook points whose name matches any glob pattern (``vit.layers.*``, ``**.mlp``)."""
    return [p for p in points if any(glob_match(p.name, pat) for pat in patterns)]


def weights_sha256(folder: Path) -> str:
    """sha256 over every ``*.safetensors`` file in a model folder (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
