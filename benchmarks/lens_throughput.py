"""Lens performance: recording overhead, shuffled read throughput, extraction memory.

    python benchmarks/lens_throughput.py [--images 512] [--read-rows 1000000] [--d 128]

Prints one JSON line per measurement. Everything is measured in this one run, side by side:

* ``recording_overhead`` — wall time of recording a Lens of the embedded detector (forward + Recorder +
  metadata + shard writing; one point, then all six: ``resid.*`` and ``head``) divided by the same loop
  without recording
  (load + preprocess + forward + post-process, i.e. a benchmark pass). Target ≤ 1.15.
* ``read_throughput`` — tokens/s of a shuffled :class:`TokenLoader` over one float16 point (batch 4096),
  with and without metadata columns. Target ≥ 1 M tokens/s on 2 cores.
* ``extract_peak_rss`` — peak resident memory of extraction subprocesses at N and 4·N images: flat when
  extraction streams.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _toy(root: Path, n: int) -> Path:
    from blueglass.data import generate_split

    return generate_split(root, f"bench{n}", n, seed=0)


def _detector(root: Path) -> Path:
    """The pipeline's trained detector when present, else a freshly initialised one (same architecture)."""
    trained = Path("models/toy-detector")
    if (trained / "model.safetensors").exists():
        return trained
    from blueglass.config import load_params
    from blueglass.models.detector import save_detector
    from blueglass.training.detector import build_detector

    p = load_params("params.yaml").models["toy-detector"]
    folder = root / "detector"
    save_detector(build_detector(p, 64, 3), folder, ["circle", "square", "triangle"], {})
    return folder


def recording_overhead(root: Path, n: int, specs: list[str], repeats: int = 3) -> dict:
    from blueglass.data import CocoDataset
    from blueglass.features.extract import record_lens
    from blueglass.models import load_adapter

    ds = CocoDataset.load(_toy(root, n))
    adapter = load_adapter(_detector(root))

    def plain() -> None:
        with torch.no_grad():
            for i in range(0, len(ds), 64):
                recs = ds.images[i : i + 64]
                out = adapter.forward(adapter.preprocess([ds.load_image(r) for r in recs]))
                adapter.postprocess(out, [(r.height, r.width) for r in recs])

    def record() -> None:
        record_lens(adapter, ds, specs, root / "lens", batch_size=64, block_images=64)

    plain(), record()  # warm-up
    t_plain, t_rec = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        record()
        t_rec.append(time.perf_counter() - t0)
    a, b = min(t_plain), min(t_rec)
    return {
        "bench": "recording_overhead",
        "images": n,
        "points": " ".join(specs),
        "plain_s": round(a, 3),
        "record_s": round(b, 3),
        "ratio": round(b / a, 3),
        "target": 1.15,
    }


def read_throughput(root: Path, rows: int, d: int) -> list[dict]:
    from blueglass.features.align import meta_dtype
    from blueglass.features.lens import LensWriter, TokenLoader, merge_parts, write_manifest

    block = 4096
    w = LensWriter(root / "read", {"p": d}, blocks_per_shard=32)
    rng = np.random.default_rng(0)
    for b in range(rows // block):
        meta = np.zeros(block, meta_dtype(["color", "shape", "size"]))
        meta["image_id"] = b
        w.add_block(b, {"p": rng.standard_normal((block, d)).astype(np.float16)}, {"p": meta})
    write_manifest(root / "read", {"points": merge_parts([w.close()], {"p": {"d": d, "dtype": "float16"}})})
    out = []
    for columns, label in ((None, "feats+meta"), ([], "feats only")):
        loader = TokenLoader(root / "read", "p", batch_size=4096, seed=0, columns=columns)
        list(loader)  # warm the page cache
        loader.set_epoch(1)
        t0 = time.perf_counter()
        n = sum(len(batch["feats"]) for batch in loader)
        dt = time.perf_counter() - t0
        out.append(
            {
                "bench": "read_throughput",
                "what": label,
                "rows": n,
                "d": d,
                "tokens_per_s": round(n / dt),
                "target": 1_000_000,
            }
        )
    return out


def _rss_child(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from blueglass.data import CocoDataset
        from blueglass.features.extract import record_lens
        from blueglass.models import load_adapter

        ds = CocoDataset.load(_toy(root, n))
        adapter = load_adapter(_detector(root))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        record_lens(adapter, ds, ["resid.*", "head"], root / "lens", batch_size=64, block_images=64)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"images": n, "peak_rss_mb": round(peak / 1024), "before_mb": round(base / 1024)}))


def extract_memory(n: int) -> dict:
    res = []
    for k in (n, 4 * n):
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(k)], capture_output=True, text=True, check=True
        )
        res.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "bench": "extract_peak_rss",
        "runs": res,
        "growth_mb": res[1]["peak_rss_mb"] - res[0]["peak_rss_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--read-rows", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.rss_child:
        _rss_child(args.rss_child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for specs in (["resid.2"], ["resid.*", "head"]):
            print(json.dumps(recording_overhead(root, args.images, specs)), flush=True)
        for line in read_throughput(root, args.read_rows, args.d):
            print(json.dumps(line), flush=True)
    print(json.dumps(extract_memory(args.images // 2)), flush=True)


if __name__ == "__main__":
    main()
