"""SAE training-step throughput, one implementation per run, one JSON line out.

    python benchmarks/sae_throughput.py --impl {blueglass,saelens,sparsify,dictionary_learning,torch} \\
        --d-in 256 --expansion 8 --k 32 --batch 4096 --steps 30 [--data acts.npy]
    python benchmarks/sae_throughput.py --all [--repeats 3]   # every impl × d_in {256, 768} × expansion {8, 16}

* ``blueglass`` — :class:`blueglass.interp.sae.SparseAutoencoder` (TopK): one dense encoder GEMM and an
  exact two-stage top-k forward, backward through the k selected latents only, sparse decode.
* ``torch`` — the plain dense reference: dense pre-activations, top-k mask, dense decode, autograd.

Also reports ``gemm_ms`` (one ``torch.mm`` of ``[batch, d_in] × [d_in, d_sae]`` timed in the same process,
right before and after the timed steps, fastest of 6: the floor) and the step time as a multiple of it.
``--all`` runs every impl × configuration ``--repeats`` times, interleaved (impls inside configurations
inside repeats), and keeps each cell's fastest run, so that load from other processes hits every impl
alike. ``fvu`` is measured on the last 8192 rows (held out).
Data: ``--data`` (float32 ``[N, d_in]`` .npy) or synthetic activations with planted sparse features.
* ``saelens`` (``TopKTrainingSAE.training_forward_pass``), ``sparsify`` (EleutherAI ``SparseCoder``, its
  fused TopK encoder), ``dictionary_learning`` (``TopKTrainer.update``): each library's own TopK training
  step. Peers live in a separate environment (``benchmarks/.venv``, created on first use with pip:
  torch==2.14.1, sae-lens, eai-sparsify, dictionary-learning), never in the project's dependencies; the
  script re-runs itself there (``BLUEGLASS_BENCH_PYTHON`` names another interpreter).

Every impl trains with Adam (lr 1e-3) on the same batches; a step is forward + backward + optimiser
update (+ the library's own decoder normalisation where its step does it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def synthetic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_feat = 4 * d
    dictionary = F.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    idx = torch.randint(0, n_feat, (n, 16), generator=g)
    mags = torch.rand(n, 16, generator=g) * 3
    return F.embedding_bag(idx, dictionary, per_sample_weights=mags, mode="sum") + 0.05 * torch.randn(
        n, d, generator=g
    )


class DenseTopK(torch.nn.Module):
    """The plain PyTorch reference a researcher would write first."""

    def __init__(self, d_in: int, d_sae: int, k: int):
        super().__init__()
        w = F.normalize(torch.randn(d_sae, d_in), dim=1)
        self.W_dec = torch.nn.Parameter(w.clone())
        self.W_enc = torch.nn.Parameter(w.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.k = k

    def codes(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))

    def loss(self, x):
        x_hat = self.codes(x) @ self.W_dec + self.b_dec
        return (x_hat - x).pow(2).sum(-1).mean()

    def forward(self, x):
        return self.codes(x) @ self.W_dec + self.b_dec


PEERS = ("saelens", "sparsify", "dictionary_learning")
IMPLS = ("blueglass", "torch", *PEERS)
REPO = Path(__file__).resolve().parents[1]


def bench_python() -> str:
    """The benchmark environment's interpreter, created on first use."""
    if os.environ.get("BLUEGLASS_BENCH_PYTHON"):
        return os.environ["BLUEGLASS_BENCH_PYTHON"]
    venv = REPO / "benchmarks" / ".venv"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating the peer benchmark environment in {venv} (once; several GB)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                "torch==2.14.1",
                "sae-lens",
                "eai-sparsify",
                "dictionary-learning",
            ],
            check=True,
        )
    return str(py)


def make_impl(name: str, d_in: int, d_sae: int, k: int, train: torch.Tensor):
    """(step(xb), reconstruct(x)) for one implementation; ``step`` includes the optimiser update."""
    if name == "blueglass":
        from blueglass.interp.sae import SAEConfig, SparseAutoencoder

        sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, variant="topk", k=k, aux_k=0))
        sae.init_from_data(train[:8192], method="mean")
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)

        def step(xb):
            loss = sae.training_step(xb)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.constrain_decoder(before_step=True)
            opt.step()
            sae.constrain_decoder(before_step=False)

        return step, sae
    if name == "torch":
        model = DenseTopK(d_in, d_sae, k)
        with torch.no_grad():
            model.b_dec.copy_(train[:8192].mean(0))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(xb):
            loss = model.loss(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, model
    if name == "saelens":
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu")
        )
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)

        def step(xb):
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=xb,
                    coefficients={},
                    dead_neuron_mask=None,
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        return step, (lambda x: sae.decode(sae.encode(x)))
    if name == "sparsify":
        if not torch.cuda.is_available():  # its Triton decoder needs a GPU; the eager one is its CPU path
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device="cpu")
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)

        def step(xb):
            out = sae(xb)
            opt.zero_grad(set_to_none=True)
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sae.set_decoder_norm_to_unit_norm()

        return step, (lambda x: sae(x).sae_out)
    if name == "dictionary_learning":
        from dictionary_learning.trainers.top_k import TopKTrainer

        trainer = TopKTrainer(
            steps=10_000,
            activation_dim=d_in,
            dict_size=d_sae,
            k=k,
            layer=0,
            lm_name="bench",
            lr=1e-3,
            warmup_steps=1,
            device="cpu",
        )
        counter = iter(range(10**9))
        return (lambda xb: trainer.update(next(counter), xb)), trainer.ae
    raise SystemExit(f"unknown impl {name}")


def run_one(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_sae = args.d_in * args.expansion
    x = (
        torch.from_numpy(np.load(args.data).astype(np.float32))
        if args.data
        else synthetic(args.batch * 8 + 8192, args.d_in)
    )
    train, held = x[:-8192], x[-8192:]
    step, reconstruct = make_impl(args.impl, args.d_in, d_sae, args.k, train)
    batches = [
        train[(i * args.batch) % (len(train) - args.batch) :][: args.batch] for i in range(args.steps + 3)
    ]
    for xb in batches[:3]:  # warm-up
        step(xb)
    a, w = batches[0], torch.randn(args.d_in, d_sae)
    torch.mm(a, w)
    gemm = []

    def time_gemm():
        for _ in range(3):
            t = time.perf_counter()
            torch.mm(a, w)
            gemm.append(time.perf_counter() - t)

    time_gemm()
    t0 = time.perf_counter()
    for xb in batches[3:]:
        step(xb)
    step_s = (time.perf_counter() - t0) / args.steps
    time_gemm()
    with torch.no_grad():
        err = (reconstruct(held) - held).pow(2).sum(-1).mean()
        fvu = float(err / (held - held.mean(0)).pow(2).sum(-1).mean())
    gemm_s = min(gemm)
    return {
        "impl": args.impl,
        "d_in": args.d_in,
        "d_sae": d_sae,
        "k": args.k,
        "batch": args.batch,
        "steps": args.steps,
        "step_ms": round(step_s * 1e3, 2),
        "steps_per_s": round(1 / step_s, 3),
        "samples_per_s": round(args.batch / step_s),
        "fvu": round(fvu, 4),
        "gemm_ms": round(gemm_s * 1e3, 2),
        "step_over_gemm": round(step_s / gemm_s, 2),
    }


def run_all(args) -> None:
    """Every impl × configuration, each in its own process (peers in the benchmark environment),
    ``args.repeats`` interleaved rounds; each (configuration, impl) keeps its fastest run."""
    best: dict[tuple[int, int, str], dict] = {}  # fastest run per cell
    floor: dict[tuple[int, int, str], float] = {}  # lowest step ÷ GEMM per cell
    for _ in range(args.repeats):
        for d_in in (256, 768):
            for expansion in (8, 16):
                steps = args.steps if d_in * expansion <= 4096 else max(5, args.steps // 3)
                for impl in IMPLS:
                    py = bench_python() if impl in PEERS else sys.executable
                    cmd = [py, __file__, "--impl", impl, "--d-in", str(d_in), "--expansion", str(expansion)]
                    cmd += ["--k", str(args.k), "--batch", str(args.batch), "--steps", str(steps)]
                    cmd += ["--threads", str(args.threads)]
                    env = {**os.environ, "PYTHONPATH": str(REPO)}
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if proc.returncode == 0:
                        row = json.loads(proc.stdout.strip().splitlines()[-1])
                    else:
                        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                        row = {"impl": impl, "d_in": d_in, "d_sae": d_in * expansion, "error": err}
                    print(json.dumps(row), flush=True)
                    key = (d_in, d_in * expansion, impl)
                    old = best.get(key)
                    if (
                        old is None
                        or "error" in old
                        or ("error" not in row and row["step_ms"] < old["step_ms"])
                    ):
                        best[key] = row
                    if "error" not in row:
                        floor[key] = min(floor.get(key, math.inf), row["step_over_gemm"])
    print_table(best, floor)


def print_table(best: dict[tuple[int, int, str], dict], floor: dict[tuple[int, int, str], float]) -> None:
    """Markdown: per cell and impl, the fastest run and the lowest step ÷ GEMM over the repeats, and
    BlueGlass's speed-up over it both in wall time and GEMM-normalised (robust to load that hit one
    run's slot and not another's)."""
    print(
        "\n| d_in × d_sae | impl | step ms | steps/s | step ÷ GEMM | FVU | BlueGlass speed-up (time / GEMM-normalised) |"
        "\n|---|---|---|---|---|---|---|"
    )
    for d_in, d_sae, impl in best:
        r, ours = best[(d_in, d_sae, impl)], best.get((d_in, d_sae, "blueglass"), {})
        if "error" in r:
            print(f"| {d_in} × {d_sae} | {impl} | error: {r['error']} | | | | |")
            continue
        speedup = ""
        if impl != "blueglass" and "step_ms" in ours:
            ratio = floor[(d_in, d_sae, impl)] / floor[(d_in, d_sae, "blueglass")]
            speedup = f"{r['step_ms'] / ours['step_ms']:.2f}× / {ratio:.2f}×"
        print(
            f"| {d_in} × {d_sae} | {impl} | {r['step_ms']} | {r['steps_per_s']} | {floor[(d_in, d_sae, impl)]} "
            f"| {r['fvu']} | {speedup} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=IMPLS)
    ap.add_argument("--all", action="store_true", help="every impl x d_in {256, 768} x expansion {8, 16}")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="--all: interleaved rounds, fastest kept")
    args = ap.parse_args()
    if args.all:
        run_all(args)
        return
    if args.impl is None:
        ap.error("--impl or --all is required")
    if args.impl == "sparsify" and not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read when sparsify is imported
    if args.impl in PEERS:
        try:
            __import__(
                {"saelens": "sae_lens", "sparsify": "sparsify", "dictionary_learning": "dictionary_learning"}[
                    args.impl
                ]
            )
        except ImportError:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            raise SystemExit(
                subprocess.run([bench_python(), __file__, *sys.argv[1:]], env=env).returncode
            ) from None
    print(json.dumps(run_one(args)))


if __name__ == "__main__":
    main()
