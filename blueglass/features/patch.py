"""The Feature Patcher: interventions on a running model through forward hooks at its hook points.

An :class:`Intervention` maps the activations of the selected tokens ``[N, d]`` to new ones:

* :class:`SAEReconstruct` — the SAE's reconstruction; ``keep_error=True`` adds the SAE's error term back
  (``x̂ + (x − x̂)``), which must reproduce the clean model up to float error: a built-in sanity check of
  the hooks themselves;
* :class:`ZeroAblate`, :class:`MeanAblate` (the per-dimension mean from the Lens manifest);
* :class:`Steer` — add ``alpha · direction`` (a probe's weight row or an SAE decoder row);
* :class:`ClampLatents` — set chosen SAE latents to a value and decode (with the error term by default,
  so only those latents' contribution changes).

A :class:`Patch` puts one intervention at one point on a token selection (``"all"``, a token kind —
``cls``, ``patch``, ``query``, ``text`` — or a boolean ``[batch, tokens]`` mask); :class:`FeaturePatcher`
applies any number of patches at once, as a context manager. Points are named as for the recorder (module
paths, globs, adapter aliases, ``:input`` for what a module receives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from blueglass.errors import ModelError
from blueglass.features.align import KIND_NAMES, declared_layout, token_layout
from blueglass.features.recorder import ResolvedPoint, as_tokens, resolve_points
from blueglass.interp.sae import SparseAutoencoder

KINDS = {v: k for k, v in KIND_NAMES.items()}


class Intervention(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` activations of the selected tokens → their replacement."""
        ...


@dataclass
class SAEReconstruct:
    sae: SparseAutoencoder
    keep_error: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x_hat = self.sae.decode(self.sae.encode(xf))
        return x_hat + (xf - x_hat) if self.keep_error else x_hat


@dataclass
class ZeroAblate:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@dataclass
class MeanAblate:
    mean: torch.Tensor  # [d]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean.to(x.device, x.dtype).expand_as(x)


@dataclass
class Steer:
    direction: torch.Tensor  # [d]
    alpha: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.direction.to(x.device, x.dtype)


@dataclass
class ClampLatents:
    sae: SparseAutoencoder
    latents: Sequence[int]
    value: float = 0.0
    keep_error: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        codes = self.sae.encode(xf)
        x_hat = self.sae.decode(codes)
        codes[:, list(self.latents)] = self.value
        new = self.sae.decode(codes)
        return new + (xf - x_hat) if self.keep_error else new


Tokens = str | torch.Tensor | Callable[[int, int], torch.Tensor]


@dataclass
class Patch:
    point: str
    intervention: Intervention
    tokens: Tokens = "all"  # "all", a token kind name, or a [batch, tokens] bool mask


@dataclass
class _Bound:
    point: ResolvedPoint
    patches: list[Patch] = field(default_factory=list)


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its first tensor replaced by ``new`` (tensor, tuple / list, or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, dict):  # transformers ModelOutput: keep its class
        key = next(k for k, v in output.items() if _has_tensor(v))
        output[key] = _replace_first(output[key], new)
        return output
    if isinstance(output, list | tuple):
        items = list(output)
        i = next(i for i, v in enumerate(items) if _has_tensor(v))
        items[i] = _replace_first(items[i], new)
        return type(output)(items) if isinstance(output, tuple) and type(output) is tuple else items
    raise ModelError(f"cannot patch an output of type {type(output).__name__}")


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_has_tensor(x) for x in v)
    return False


def _first(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    items = v.values() if isinstance(v, dict) else v
    return next(_first(x) for x in items if _has_tensor(x))


def _from_tokens(tok: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_tokens` for a tensor shaped like ``like``."""
    if like.ndim == 3:
        return tok
    if like.ndim == 4:
        b, c, h, w = like.shape
        return tok.transpose(1, 2).reshape(b, c, h, w)
    return tok[:, 0, :]


class FeaturePatcher:
    """Apply :class:`Patch` es to ``adapter.module`` while the context is open.

    >>> with FeaturePatcher(adapter, [Patch("vit.layers.3", SAEReconstruct(sae))]):
    ...     metrics = evaluate(adapter, ds)
    """

    def __init__(self, adapter: Any, patches: Sequence[Patch]):
        self.adapter = adapter
        self.module = adapter.module
        points = {p.name: p for p in adapter.hook_points()}
        aliases = getattr(adapter, "aliases", dict)()
        self._bound: dict[str, _Bound] = {}
        for patch in patches:
            if isinstance(patch.tokens, str) and patch.tokens != "all" and patch.tokens not in KINDS:
                raise ModelError(
                    f"unknown token selection {patch.tokens!r} (all, {', '.join(sorted(KINDS))}, or a mask)"
                )
            for rp in resolve_points([patch.point], list(points.values()), aliases):
                self._bound.setdefault(rp.name, _Bound(rp)).patches.append(patch)
        self._handles: list[Any] = []

    def _kinds(self, module_name: str, n_tokens: int) -> np.ndarray:
        layout_of = getattr(self.adapter, "point_layout", None)
        layout = layout_of(module_name) if layout_of else None
        if layout is not None:
            return declared_layout(n_tokens, layout)[0]
        return token_layout(n_tokens, getattr(self.adapter, "grid", None))[0]

    def _mask(self, tokens: Tokens, module_name: str, b: int, t: int, device) -> torch.Tensor | None:
        if isinstance(tokens, torch.Tensor):
            if tuple(tokens.shape) != (b, t):
                raise ModelError(f"token mask of shape {tuple(tokens.shape)}; this batch needs ({b}, {t})")
            return tokens.to(device=device, dtype=torch.bool)
        if callable(tokens):
            return tokens(b, t).to(device=device, dtype=torch.bool)
        if tokens == "all":
            return None
        kinds = torch.from_numpy(self._kinds(module_name, t) == KINDS[tokens]).to(device)
        return kinds[None].expand(b, t)

    def _apply(self, bound: _Bound, value: Any) -> Any:
        orig = _first(value)
        tok = as_tokens(orig)
        b, t, _ = tok.shape
        new = tok.clone()
        for patch in bound.patches:
            mask = self._mask(patch.tokens, bound.point.module, b, t, tok.device)
            if mask is None:
                new = patch.intervention(new.reshape(b * t, -1)).to(tok.dtype).reshape(b, t, -1)
            elif mask.any():
                new[mask] = patch.intervention(new[mask]).to(tok.dtype)
        return _replace_first(value, _from_tokens(new, orig))

    def __enter__(self) -> FeaturePatcher:
        modules = dict(self.module.named_modules())
        for bound in self._bound.values():
            mod = modules[bound.point.module]
            if bound.point.on_input:
                hook = mod.register_forward_pre_hook(lambda _m, args, b=bound: self._apply(b, args))
            else:
                hook = mod.register_forward_hook(lambda _m, _i, out, b=bound: self._apply(b, out))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def points(self) -> list[str]:
        return list(self._bound)


def patch_from_spec(
    spec: dict[str, Any],
    *,
    sae: SparseAutoencoder | None = None,
    direction: np.ndarray | None = None,
    mean: Sequence[float] | None = None,
) -> Patch:
    """A :class:`Patch` from its JSON form (``kind, point, tokens`` + the kind's settings) and the loaded
    SAE / probe direction / Lens mean it needs — the one place stages and the registered patched-model
    pyfunc turn a stored intervention into hooks."""
    kind = spec["kind"]
    if kind in ("sae", "sae_error"):
        iv: Intervention = SAEReconstruct(sae, keep_error=kind == "sae_error")
    elif kind == "clamp":
        iv = ClampLatents(sae, list(spec["latents"]), float(spec.get("value", 0.0)))
    elif kind == "steer":
        iv = Steer(torch.as_tensor(direction, dtype=torch.float32), float(spec["alpha"]))
    elif kind == "zero":
        iv = ZeroAblate()
    elif kind == "mean":
        iv = MeanAblate(torch.as_tensor(mean, dtype=torch.float32))
    else:
        raise ModelError(f"unknown intervention kind {kind!r}")
    return Patch(spec["point"], iv, spec.get("tokens", "all"))
