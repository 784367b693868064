"""Run under torchrun by tests/test_sae_training.py: train one SAE with DDP, report what this rank did."""

import hashlib
import json
import sys

import torch

from blueglass.interp.sae import SAEConfig
from blueglass.interp.train import TrainSettings, train_sae

lens_root, out = sys.argv[1], sys.argv[2]
res = train_sae(
    lens_root,
    "p",
    SAEConfig(d_in=16, d_sae=64, variant="topk", k=4, aux_k=8),
    TrainSettings(steps=12, batch_size=256, devices=2),
)
weights = b"".join(
    v.detach().contiguous().numpy().tobytes()
    for v in res["sae"].state_dict().values()
    if v.is_floating_point()
)
with open(f"{out}/rank{res['rank']}.json", "w") as fh:
    json.dump(
        {
            "rank": res["rank"],
            "world": res["world_size"],
            "steps": res["steps"],
            "shards": res["shards_read"],
            "weights": hashlib.sha256(weights).hexdigest(),
            "fvu": res["metrics"]["fvu"],
        },
        fh,
    )
torch.distributed.barrier() if torch.distributed.is_initialized() else None
