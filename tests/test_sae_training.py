"""Lightning SAE training on a Lens: single process and 2-process DDP (gloo)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import torchrun_cmd

from blueglass.features.align import meta_dtype
from blueglass.features.lens import LensWriter, merge_parts, write_manifest
from blueglass.interp.sae import SAEConfig, SparseAutoencoder
from blueglass.interp.train import TrainSettings, default_lr, train_sae, train_saes


def planted_lens(root: Path, n_blocks=12, rows=1024, d=16, n_feat=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    w = LensWriter(root, {"p": d}, blocks_per_shard=2, dtype="float32")
    for b in range(n_blocks):
        idx = torch.stack([torch.randperm(n_feat, generator=g)[:3] for _ in range(rows)])
        codes = torch.zeros(rows, n_feat).scatter_(1, idx, 1 + 2 * torch.rand(rows, 3, generator=g))
        x = (codes @ dictionary + 0.3).numpy()
        meta = np.zeros(rows, meta_dtype([]))
        meta["image_id"] = b
        w.add_block(b, {"p": x}, {"p": meta})
    write_manifest(root, {"points": merge_parts([w.close()], {"p": {"d": d, "dtype": "float32"}})})
    return dictionary


def test_train_sae_single_process(tmp_path):
    dictionary = planted_lens(tmp_path / "lens")
    res = train_sae(
        tmp_path / "lens",
        "p",
        SAEConfig(d_in=16, d_sae=64, variant="topk", k=4, aux_k=16, dead_tokens=20000),
        TrainSettings(steps=400, batch_size=512, lr=3e-3),
    )
    m = res["metrics"]
    assert res["steps"] == 400 and res["world_size"] == 1
    assert m["fvu"] < 0.1 and m["l0"] <= 4 and 0 <= m["dead_frac"] <= 1 and 0 <= m["dense_frac"] <= 1
    learned = F.normalize(res["sae"].folded_state()["W_dec"], dim=1)
    assert float((dictionary @ learned.T).max(1).values.mean()) > 0.9
    assert res["firing_frequency"].shape == (64,)
    # the held-out shard was never read for training
    assert res["shards_read"] == sorted(f"p/shard-000-{i:06d}.tar" for i in range(5))
    res["sae"].save(tmp_path / "sae")
    assert SparseAutoencoder.load(tmp_path / "sae").cfg.k == 4


def test_default_lr_rule():
    assert default_lr(2**14) == 2e-4 and default_lr(2**16) == 1e-4


def test_ddp_two_processes_take_equal_steps_on_disjoint_shards(tmp_path):
    planted_lens(tmp_path / "lens")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_cmd(
        29541,
        str(Path(__file__).parent / "ddp_train_sae.py"),
        str(tmp_path / "lens"),
        str(tmp_path),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 12
    assert r0["shards"] and r1["shards"] and not set(r0["shards"]) & set(r1["shards"])
    assert len(set(r0["shards"]) | set(r1["shards"])) == 5  # every training shard, the held-out one excluded
    assert r0["weights"] == r1["weights"]
    # probes under the same DDP job: identical heads on both ranks, and they still learn the concept
    assert r0["probe_weights"] == r1["probe_weights"] and r0["probe_accuracy"] > 0.9


def test_sweep_trains_each_sae_as_if_alone(tmp_path):
    planted_lens(tmp_path / "lens")
    cfgs = {
        "topk": SAEConfig(d_in=16, d_sae=64, variant="topk", k=4, aux_k=0),
        "relu": SAEConfig(d_in=16, d_sae=32, variant="relu", l1_coeff=0.5),
    }
    s = TrainSettings(steps=30, batch_size=512, lr=3e-3)
    both = train_saes(tmp_path / "lens", "p", cfgs, s)
    alone = train_saes(tmp_path / "lens", "p", {"topk": cfgs["topk"]}, s)
    assert both["steps"] == alone["steps"] == 30 and set(both["saes"]) == {"topk", "relu"}
    a, b = both["saes"]["topk"]["sae"].state_dict(), alone["saes"]["topk"]["sae"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert both["saes"]["relu"]["metrics"]["fvu"] < 1


class _Crash(pl.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.at:
            raise KeyboardInterrupt  # a killed job: nothing after this step is saved


def test_checkpoint_resume_ends_with_the_uninterrupted_weights(tmp_path):
    planted_lens(tmp_path / "lens")
    cfg = SAEConfig(d_in=16, d_sae=64, variant="topk", k=4, aux_k=16, dead_tokens=2000)

    def settings(ckpt):
        return TrainSettings(steps=40, batch_size=512, lr=3e-3, checkpoint_dir=ckpt, checkpoint_every=10)

    ref = train_saes(tmp_path / "lens", "p", {"a": cfg}, settings(None))["saes"]["a"]["sae"].state_dict()
    ckpt = tmp_path / "ckpt"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_saes(tmp_path / "lens", "p", {"a": cfg}, settings(ckpt), callbacks=[_Crash(25)])
    assert (ckpt / "last.ckpt").is_file()
    res = train_saes(tmp_path / "lens", "p", {"a": cfg}, settings(ckpt))
    assert res["steps"] == 40
    got = res["saes"]["a"]["sae"].state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref), "resumed run diverged from the uninterrupted one"
