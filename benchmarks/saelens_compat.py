"""Check that SAELens loads BlueGlass SAE folders and computes the same thing.

    python benchmarks/saelens_compat.py     # runs itself in the peer benchmark environment

For every variant: train a small SAE for a few steps, ``save`` it, load the folder with SAELens'
``SAE.load_from_disk`` and compare codes and reconstructions on the same inputs. One JSON line per variant.
SAELens is never a project dependency: it lives in ``benchmarks/.venv`` (see sae_throughput.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    try:
        from sae_lens import SAE
    except ImportError:
        sys.path.insert(0, str(Path(__file__).parent))
        from sae_throughput import bench_python

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        raise SystemExit(subprocess.run([bench_python(), __file__], env=env).returncode) from None
    import torch

    from blueglass.interp.sae import SAEConfig, SparseAutoencoder

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(4096, 32) * 3 + 1
    variants = {
        "relu": {},
        "topk": {"k": 4},
        "batchtopk": {"k": 4},
        "jumprelu": {},
        "matryoshka": {"k": 4, "matryoshka_prefixes": [16, 64]},
    }
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for variant, kw in variants.items():
            sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, variant=variant, **kw))
            sae.init_from_data(x)
            opt = torch.optim.Adam(sae.parameters(), 1e-3)
            for _ in range(20):
                loss = sae.training_step(x[:1024])["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            folder = sae.save(Path(tmp) / variant)
            with torch.no_grad():
                ours_codes, ours_rec = sae.encode(x[:256]), sae(x[:256])
                theirs = SAE.load_from_disk(str(folder), device="cpu")
                codes = theirs.encode(x[:256])
                rec = theirs.decode(codes)
            ok = bool(
                torch.allclose(codes, ours_codes, atol=1e-4) and torch.allclose(rec, ours_rec, atol=1e-4)
            )
            failed |= not ok
            print(
                json.dumps(
                    {
                        "variant": variant,
                        "saelens_class": type(theirs).__name__,
                        "same_codes_and_reconstruction": ok,
                    }
                )
            )
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
