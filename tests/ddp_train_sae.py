"""Run under torchrun by tests/test_sae_training.py: train one SAE and the probes of a labelled Lens with DDP,
report what this rank did."""

import hashlib
import json
import sys
from pathlib import Path

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
# probes: every target of a point in one LightningModule, DDP over the same two processes
sys.path.insert(0, str(Path(__file__).parent))
from test_probes import _lens_like, write_lens  # noqa: E402

from blueglass.interp.probes import ProbeSettings, ProbeTarget, train_probes  # noqa: E402

probe_lens = write_lens(Path(out) / f"probe-lens-{res['rank']}", *_lens_like())
probes = train_probes(
    probe_lens, "p", [ProbeTarget("color", "color")], ProbeSettings(devices=2, epochs=2, min_steps=40)
)
probe_hash = hashlib.sha256(probes["color"].weight.tobytes() + probes["color"].bias.tobytes()).hexdigest()
with open(f"{out}/rank{res['rank']}.json", "w") as fh:
    json.dump(
        {
            "rank": res["rank"],
            "world": res["world_size"],
            "steps": res["steps"],
            "shards": res["shards_read"],
            "weights": hashlib.sha256(weights).hexdigest(),
            "fvu": res["metrics"]["fvu"],
            "probe_weights": probe_hash,
            "probe_accuracy": probes["color"].metrics["accuracy"],
        },
        fh,
    )
torch.distributed.barrier() if torch.distributed.is_initialized() else None
