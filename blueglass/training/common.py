"""Shared training mechanics: in-memory split tensors, the LR schedule, the step loop with progress."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from blueglass.config import TrainParams
from blueglass.data import CocoDataset


@dataclass
class SplitArrays:
    """A split held in memory: images ``[N, H, W, 3]`` uint8 plus per-image object arrays."""

    images: np.ndarray
    boxes_xyxy: list[np.ndarray]  # [n_i, 4] float32 pixels
    labels: list[np.ndarray]  # [n_i] int64, category index 0..C-1
    attributes: list[list[dict[str, str]]]
    category_ids: list[int] = field(default_factory=list)


def load_split_arrays(ds: CocoDataset) -> SplitArrays:
    cat_ids = sorted(ds.categories)
    index = {c: i for i, c in enumerate(cat_ids)}
    images = np.stack([ds.load_image(r) for r in ds.images])
    boxes = [np.array([a.xyxy for a in r.annotations], np.float32).reshape(-1, 4) for r in ds.images]
    labels = [np.array([index[a.category_id] for a in r.annotations], np.int64) for r in ds.images]
    attrs = [[dict(a.attributes) for a in r.annotations] for r in ds.images]
    return SplitArrays(images, boxes, labels, attrs, cat_ids)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: torch.nn.Module, tp: TrainParams, extra: list[torch.nn.Parameter] = ()):
    """AdamW (no decay on biases, norms and embeddings) with the warm-up/cosine schedule."""
    decay, no_decay = [], list(extra)
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embeddings" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tp.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, tp.steps, tp.warmup_steps))
    return opt, sched


def run_steps(
    tp: TrainParams,
    step_fn: Callable[[int], dict[str, float]],
    opt: torch.optim.Optimizer,
    sched,
    params: list[torch.nn.Parameter],
    *,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 25,
) -> dict[str, float]:
    """Run ``tp.steps`` optimisation steps; ``step_fn`` returns a dict whose ``loss`` is a tensor."""
    history: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(tp.steps):
        opt.zero_grad(set_to_none=True)
        out = step_fn(step)
        loss = out["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == tp.steps - 1:
            history = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
            if progress is not None:
                progress(step + 1, history)
    history["train_seconds"] = time.perf_counter() - start
    return history
