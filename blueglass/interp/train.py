"""Training interpretability models on a Lens with PyTorch Lightning (DDP across processes, one precision
switch, resumable checkpoints, metrics to the stage's MLflow run through Lightning's MLflow logger).

:func:`fit` is the one training loop for SAEs and probes. Data come from :class:`TokenLoader` wrapped in
:class:`Endless`: each DDP rank reads its own shards, epoch after epoch, so every rank takes exactly
``steps`` steps and DDP never waits on a rank that ran out of data. Batches are a pure function of
``(seed, epoch, position)``, so a run resumed from a checkpoint skips the batches it already trained on and
ends with the same weights as an uninterrupted run.

:func:`train_saes` trains several SAEs (a sweep of variants / sizes) from one pass over one point: every
batch feeds every SAE; their parameters are disjoint, so summing the losses trains each exactly as alone.
It holds out the point's last shard for metrics and initialises ``b_dec`` and the input scale from the
manifest's per-dimension mean and mean norm — identical on every rank without a data pass. The default
learning rate follows the TopK paper's scaling rule ``lr = 2e-4 / sqrt(d_sae / 2**14)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from blueglass.features.lens import Lens, LensError, TokenLoader
from blueglass.interp.sae import SAEConfig, SparseAutoencoder, reconstruction_metrics


def default_lr(d_sae: int) -> float:
    """Gao et al. (2024): learning rate ∝ 1/sqrt(d_sae), 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 4096
    lr: float | None = None  # None = default_lr(d_sae) for SAEs
    warmup_steps: int = 50
    seed: int = 0
    precision: str = "32-true"  # Lightning precision: "32-true", "bf16-mixed", "16-mixed" (GPU)
    devices: int = 1
    buffer_blocks: int = 8
    heldout_shards: int = 1
    checkpoint_dir: Path | None = None  # resumable checkpoints (last.ckpt) here; None = none
    checkpoint_every: int = 500  # steps between checkpoints
    run_id: str | None = None  # MLflow run that Lightning's MLflow logger writes training curves to
    log_prefix: str = "train"


def lr_schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, constant, then linear decay to 0 over the last 20 % of the steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        tail = int(0.8 * steps)
        return 1.0 if step < tail else max(0.0, (steps - step) / max(1, steps - tail))

    return factor


class Endless(torch.utils.data.IterableDataset):
    """Epoch after epoch of a TokenLoader, optionally transformed, skipping the first ``skip`` batches
    (set on resume to the checkpoint's step)."""

    def __init__(self, loader: TokenLoader, transform: Callable[[dict[str, Any]], Any] | None = None):
        self.loader = loader
        self.transform = transform
        self.skip = 0
        self.shards_read: set[str] = set()

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = 0, self.skip
        while True:
            self.loader.set_epoch(epoch)
            self.shards_read.update(s["file"] for s in self.loader.my_shards())
            for batch in self.loader:
                if skip:
                    skip -= 1
                    continue
                yield self.transform(batch) if self.transform else batch["feats"]
            epoch += 1


class _SkipOnResume(pl.Callback):
    def __init__(self, data: Endless):
        self.data = data

    def on_load_checkpoint(self, _trainer, _module, checkpoint: dict[str, Any]) -> None:
        self.data.skip = int(checkpoint["global_step"])  # runs before the data iterator is created


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name (no ``:``)."""
    return "/".join(p.replace(":", "_") for p in parts if p)


def fit(
    module: pl.LightningModule,
    data: Endless,
    s: TrainSettings,
    callbacks: Sequence[pl.Callback] = (),
) -> pl.Trainer:
    """Train ``module`` for ``s.steps`` steps on ``data``; resumes from ``s.checkpoint_dir/last.ckpt``."""
    from blueglass.tracking import lightning_logger

    cbs: list[pl.Callback] = [_SkipOnResume(data), *callbacks]
    resume = None
    if s.checkpoint_dir is not None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        cbs.append(
            ModelCheckpoint(
                dirpath=s.checkpoint_dir,
                every_n_train_steps=s.checkpoint_every,
                save_last=True,
                save_top_k=0,
            )
        )
        last = Path(s.checkpoint_dir) / "last.ckpt"
        resume = str(last) if last.is_file() else None
    trainer = pl.Trainer(
        accelerator="auto",
        devices=s.devices,
        strategy="ddp" if s.devices > 1 or _under_torchrun() else "auto",
        precision=s.precision,
        max_steps=s.steps,
        logger=lightning_logger(s.run_id) if s.run_id else False,
        log_every_n_steps=max(1, min(50, s.steps // 20)),
        callbacks=cbs,
        enable_checkpointing=s.checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None), ckpt_path=resume
    )
    return trainer


# ---------------------------------------------------------------- SAEs
class SAEModule(pl.LightningModule):
    """Several SAEs trained side by side on the same batches (one optimiser, one param group each)."""

    def __init__(self, saes: Mapping[str, SparseAutoencoder], lrs: Mapping[str, float], s: TrainSettings):
        super().__init__()
        self.saes = nn.ModuleDict(dict(saes))
        self.lrs = dict(lrs)
        self.s = s

    def training_step(self, feats: torch.Tensor, _i: int) -> torch.Tensor:
        x = feats.float()
        total = x.new_zeros(())
        logs = {}
        for name, sae in self.saes.items():
            out = sae.training_step(x)
            total = total + out["loss"]
            logs.update({metric_key(self.s.log_prefix, name, k): v.detach().float() for k, v in out.items()})
        self.log_dict(logs)
        return total

    def on_before_optimizer_step(self, _opt) -> None:
        for sae in self.saes.values():
            sae.constrain_decoder(before_step=True)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for sae in self.saes.values():  # before any callback (checkpoints) sees the weights
            sae.constrain_decoder(before_step=False)

    def configure_optimizers(self):
        groups = [{"params": list(sae.parameters()), "lr": self.lrs[n]} for n, sae in self.saes.items()]
        opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(self.s.steps, self.s.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def heldout_split(lens: Lens, point: str, heldout: int) -> tuple[list[dict], list[dict]]:
    shards = lens.shards(point)
    if len(shards) <= heldout:
        raise LensError(
            f"{lens.root}: point {point} has {len(shards)} shard(s); need more than {heldout} to hold one out"
        )
    return shards[:-heldout], shards[-heldout:]


def train_saes(
    lens_root: str | Path,
    point: str,
    cfgs: Mapping[str, SAEConfig],
    s: TrainSettings,
    callbacks: Sequence[pl.Callback] = (),
    lrs: Mapping[str, float | None] | None = None,
) -> dict[str, Any]:
    """Train SAEs ``cfgs`` (name → config) on one Lens point from one pass over the data; ``lrs`` sets a
    learning rate per SAE (else ``s.lr``, else :func:`default_lr`).

    Returns ``{"saes": {name: {"sae", "metrics", "firing_frequency", "heldout_codes", "lr"}},
    "heldout_meta", "steps", "rank", "world_size", "shards_read"}``; metrics are on the held-out shard(s).
    Under ``torchrun`` / several ``devices``, Lightning runs DDP (gloo on CPU); every rank ends with the same
    weights.
    """
    lens = Lens(lens_root)
    info = lens.point(point)
    train_shards, held_shards = heldout_split(lens, point, s.heldout_shards)
    pl.seed_everything(s.seed, workers=True, verbose=False)
    saes, lr_used = {}, {}
    for name, cfg in cfgs.items():
        sae = SparseAutoencoder(cfg)
        with torch.no_grad():  # data-free, rank-independent initialisation from the manifest
            scale = math.sqrt(cfg.d_in) / max(float(info["mean_norm"]), 1e-8)
            sae.input_scale.fill_(scale)
            sae.b_dec.copy_(torch.tensor(info["mean"], dtype=torch.float32) * scale)
        saes[name] = sae
        lr = (lrs or {}).get(name) or s.lr
        lr_used[name] = lr if lr is not None else default_lr(cfg.d_sae)
    data = Endless(
        TokenLoader(
            lens,
            point,
            batch_size=s.batch_size,
            seed=s.seed,
            buffer_blocks=s.buffer_blocks,
            columns=[],
            shards=train_shards,
        )
    )
    module = SAEModule(saes, lr_used, s)
    trainer = fit(module, data, s, callbacks)
    held_blocks = [b for sh in held_shards for b in lens.read_shard(sh)]
    held = torch.from_numpy(np.concatenate([b.feats for b in held_blocks])).float()
    out = {}
    for name, sae in module.saes.items():
        sae = sae.cpu().eval()
        metrics = reconstruction_metrics(sae, held)
        metrics["dead_frac"] = sae.dead_fraction()
        with torch.no_grad():
            codes = sae.encode(held)
            freq = (codes > 0).float().mean(0)
        metrics["dense_frac"] = float((freq > 0.1).float().mean())
        out[name] = {
            "sae": sae,
            "metrics": metrics,
            "firing_frequency": freq.numpy(),
            "heldout_codes": codes.numpy(),  # [rows, d_sae] on the held-out shard(s), for concept recovery
            "lr": lr_used[name],
        }
    return {
        "saes": out,
        "heldout_meta": np.concatenate([b.meta for b in held_blocks]),
        "steps": trainer.global_step,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "shards_read": sorted(data.shards_read),
    }


def train_sae(lens_root: str | Path, point: str, cfg: SAEConfig, s: TrainSettings) -> dict[str, Any]:
    """One SAE: :func:`train_saes` with a single config, its entry flattened into the result."""
    res = train_saes(lens_root, point, {"sae": cfg}, s)
    return {**{k: v for k, v in res.items() if k != "saes"}, **res["saes"]["sae"]}


def _under_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1
