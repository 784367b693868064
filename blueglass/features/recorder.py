"""The Feature Recorder: forward hooks at named hook points → per-image ``[tokens, d]`` activations.

A point is named by module path (``vit.layers.2``), a glob (``vit.layers.*``: ``*`` within one path
segment, ``**`` across), or an adapter alias (``resid.2``). Suffix ``:input`` records what the module
receives (a forward *pre*-hook) instead of what it returns — the natural residual-stream position before
a block. Unknown points fail before any forward pass, listing valid ones. Hooks only read: the model's
outputs are bit-identical with or without a recorder, and with no points nothing is registered at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blueglass.errors import ModelError
from blueglass.models.base import HookPoint, first_tensor, glob_match

INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class ResolvedPoint:
    name: str  # what the Lens calls it: module path, plus ":input" for pre-hook points
    module: str  # module path
    on_input: bool


def resolve_points(
    specs: Sequence[str], available: Sequence[HookPoint], aliases: dict[str, str] | None = None
) -> list[ResolvedPoint]:
    """Expand aliases and globs against the model's hook points; keep the model's module order."""
    aliases = aliases or {}
    names = [p.name for p in available]
    order = {n: i for i, n in enumerate(names)}
    out: dict[str, ResolvedPoint] = {}
    for spec in specs:
        on_input = spec.endswith(INPUT_SUFFIX)
        base = spec.removesuffix(INPUT_SUFFIX)
        via_alias = {aliases[a] for a in aliases if glob_match(a, base)}
        hits = [n for n in names if glob_match(n, base) or n in via_alias]
        if not hits:
            shown = ", ".join(names[:12]) + (" …" if len(names) > 12 else "")
            alias_txt = f"; aliases: {', '.join(sorted(aliases))}" if aliases else ""
            raise ModelError(f"unknown hook point {spec!r} (valid: {shown}{alias_txt})")
        for n in hits:
            rp = ResolvedPoint(n + (INPUT_SUFFIX if on_input else ""), n, on_input)
            out[rp.name] = rp
    return sorted(out.values(), key=lambda p: (order[p.module], p.on_input is False))


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """Flatten one point's batch output to ``[B, tokens, d]``.

    ``[B, T, d]`` stays; a conv map ``[B, C, H, W]`` becomes ``[B, H·W, C]`` (row-major patches);
    ``[B, d]`` becomes one token per image.
    """
    if t.ndim == 3:
        return t
    if t.ndim == 4:
        return t.flatten(2).transpose(1, 2)
    if t.ndim == 2:
        return t[:, None, :]
    raise ModelError(f"cannot lay out an activation of shape {tuple(t.shape)} as tokens")


class Recorder:
    """Context manager recording the given points on ``module``.

    >>> with Recorder(adapter.module, points) as rec:
    ...     out = adapter.forward(batch)
    >>> acts = rec.take()  # {point name: [B, tokens, d] tensor (detached, on CPU, in ``dtype``)}
    """

    def __init__(
        self, module: nn.Module, points: Sequence[ResolvedPoint], dtype: torch.dtype = torch.float16
    ):
        self.module = module
        self.points = list(points)
        self.dtype = dtype
        self._handles: list[Any] = []
        self._acts: dict[str, torch.Tensor] = {}

    def _store(self, name: str, value: Any) -> None:
        t = first_tensor(value)
        if t is None:
            raise ModelError(f"hook point {name} produced no tensor")
        # .to(cpu, dtype) copies (the model's own tensor is never touched or kept alive)
        self._acts[name] = as_tokens(t.detach()).to("cpu", self.dtype, copy=True)

    def __enter__(self) -> Recorder:
        modules = dict(self.module.named_modules())
        for p in self.points:
            mod = modules[p.module]
            if p.on_input:
                self._handles.append(
                    mod.register_forward_pre_hook(lambda _m, args, n=p.name: self._store(n, args))
                )
            else:
                self._handles.append(
                    mod.register_forward_hook(lambda _m, _i, out, n=p.name: self._store(n, out))
                )
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take(self) -> dict[str, torch.Tensor]:
        """The activations of the last forward pass (and forget them)."""
        acts, self._acts = self._acts, {}
        missing = [p.name for p in self.points if p.name not in acts]
        if missing:
            raise ModelError(f"hook point(s) {', '.join(missing)} did not run in this forward pass")
        return acts
