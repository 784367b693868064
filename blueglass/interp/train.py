"""Training SAEs on a Lens with PyTorch Lightning (DDP across processes, one precision switch).

``train_sae`` streams token batches from a Lens point with :class:`TokenLoader` (each DDP rank reads its
own shards; an endless epoch loop gives every rank exactly ``steps`` steps, so DDP never waits on a rank
that ran out of data), holds out the point's last shard for metrics, and initialises ``b_dec`` and the
input scale from the manifest's per-dimension mean and mean norm — identical on every rank without a data
pass. The default learning rate follows the TopK paper's scaling rule ``lr = 2e-4 / sqrt(d_sae / 2**14)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blueglass.features.lens import Lens, TokenLoader
from blueglass.interp.sae import SAEConfig, SparseAutoencoder, reconstruction_metrics


def default_lr(d_sae: int) -> float:
    """Gao et al. (2024): learning rate ∝ 1/sqrt(d_sae), 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 4096
    lr: float | None = None  # None = default_lr(d_sae)
    warmup_steps: int = 50
    seed: int = 0
    precision: str = "32-true"  # Lightning precision: "32-true", "bf16-mixed", "16-mixed" (GPU)
    devices: int = 1
    buffer_blocks: int = 8
    heldout_shards: int = 1


class _Endless(torch.utils.data.IterableDataset):
    """Epoch after epoch of a TokenLoader (feats only), so every rank can take exactly N steps."""

    def __init__(self, loader: TokenLoader):
        self.loader = loader
        self.shards_read: set[str] = set()

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            self.shards_read.update(s["file"] for s in self.loader.my_shards())
            for batch in self.loader:
                yield batch["feats"]
            epoch += 1


def _module(sae: SparseAutoencoder, s: TrainSettings, lr: float):
    import pytorch_lightning as pl

    class SAEModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.sae = sae
            self.steps_taken = 0

        def training_step(self, feats, _i):
            out = self.sae.training_step(feats.float())
            self.steps_taken += 1
            self.log_dict({f"train/{k}": v.detach().float() for k, v in out.items()}, prog_bar=False)
            return out["loss"]

        def on_before_optimizer_step(self, _opt):
            self.sae.constrain_decoder(before_step=True)

        def on_train_batch_end(self, *_):
            self.sae.constrain_decoder(before_step=False)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.sae.parameters(), lr=lr, betas=(0.9, 0.999))

            def schedule(step: int) -> float:  # warm-up, then linear decay over the last 20 %
                if step < s.warmup_steps:
                    return (step + 1) / s.warmup_steps
                tail = int(0.8 * s.steps)
                return 1.0 if step < tail else max(0.0, (s.steps - step) / max(1, s.steps - tail))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return SAEModule()


def train_sae(lens_root: str | Path, point: str, cfg: SAEConfig, s: TrainSettings) -> dict[str, Any]:
    """Train one SAE on one Lens point; returns metrics on the held-out shard(s) and run facts.

    Under ``torchrun`` / several ``devices``, Lightning runs DDP (gloo on CPU); every rank returns the same
    weights. The SAE is in ``result["sae"]``.
    """
    import pytorch_lightning as pl

    lens = Lens(lens_root)
    info = lens.point(point)
    shards = lens.shards(point)
    if len(shards) <= s.heldout_shards:
        from blueglass.features.lens import LensError

        raise LensError(
            f"{lens_root}: point {point} has {len(shards)} shard(s); need more than {s.heldout_shards} to hold one out"
        )
    train_shards, held_shards = shards[: -s.heldout_shards], shards[-s.heldout_shards :]
    pl.seed_everything(s.seed, workers=True, verbose=False)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():  # data-free, rank-independent initialisation from the manifest
        scale = math.sqrt(cfg.d_in) / max(float(info["mean_norm"]), 1e-8)
        sae.input_scale.fill_(scale)
        sae.b_dec.copy_(torch.tensor(info["mean"], dtype=torch.float32) * scale)
    lr = s.lr if s.lr is not None else default_lr(cfg.d_sae)
    data = _Endless(
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
    module = _module(sae, s, lr)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=s.devices,
        strategy="ddp" if s.devices > 1 or _under_torchrun() else "auto",
        precision=s.precision,
        max_steps=s.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    sae.eval()
    held_blocks = [b for sh in held_shards for b in lens.read_shard(sh)]
    held = np.concatenate([b.feats for b in held_blocks])
    metrics = reconstruction_metrics(sae, torch.from_numpy(held).float())
    metrics["dead_frac"] = sae.dead_fraction()
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(held).float())
        freq = (codes > 0).float().mean(0)
    metrics["dense_frac"] = float((freq > 0.1).float().mean())
    return {
        "sae": sae,
        "metrics": metrics,
        "firing_frequency": freq.numpy(),
        "heldout_codes": codes.numpy(),  # [rows, d_sae] on the held-out shard(s), for concept recovery
        "heldout_meta": np.concatenate([b.meta for b in held_blocks]),
        "steps": module.steps_taken,
        "lr": lr,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "shards_read": sorted(data.shards_read),
    }


def _under_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1
