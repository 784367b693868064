"""SAE training-step throughput, one implementation per run, one JSON line out.

    python benchmarks/sae_throughput.py --impl {blueglass,torch} --d-in 256 --expansion 8 --k 32 \\
        --batch 4096 --steps 30 [--data acts.npy]

* ``blueglass`` — :class:`blueglass.interp.sae.SparseAutoencoder` (TopK): one dense encoder GEMM
  forward, backward through the k selected latents only, ``embedding_bag`` decode.
* ``torch`` — the plain dense reference: dense pre-activations, top-k mask, dense decode, autograd.

Also reports ``gemm_ms`` (one ``torch.mm`` of ``[batch, d_in] × [d_in, d_sae]`` timed in the same run: the
floor) and the step time as a multiple of it. ``fvu`` is measured on the last 8192 rows (held out).
Data: ``--data`` (float32 ``[N, d_in]`` .npy) or synthetic activations with planted sparse features.
Peers (SAELens, sparsify, dictionary_learning) are not wired in yet: they install into a separate
benchmark environment, never into the project's dependencies.
"""

from __future__ import annotations

import argparse
import json
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["blueglass", "torch"], required=True)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_sae = args.d_in * args.expansion
    x = (
        torch.from_numpy(np.load(args.data).astype(np.float32))
        if args.data
        else synthetic(args.batch * 8 + 8192, args.d_in)
    )
    train, held = x[:-8192], x[-8192:]

    if args.impl == "blueglass":
        from blueglass.interp.sae import SAEConfig, SparseAutoencoder, reconstruction_metrics

        model = SparseAutoencoder(SAEConfig(d_in=args.d_in, d_sae=d_sae, variant="topk", k=args.k, aux_k=0))
        model.init_from_data(train[:8192], method="mean")

        def step_loss(xb):
            return model.training_step(xb)["loss"]

        def fvu():
            return reconstruction_metrics(model, held)["fvu"]
    else:
        model = DenseTopK(args.d_in, d_sae, args.k)
        with torch.no_grad():
            model.b_dec.copy_(train[:8192].mean(0))

        def step_loss(xb):
            return model.loss(xb)

        def fvu():
            with torch.no_grad():
                err = (model(held) - held).pow(2).sum(-1).mean()
                return float(err / (held - held.mean(0)).pow(2).sum(-1).mean())

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [
        train[(i * args.batch) % (len(train) - args.batch) :][: args.batch] for i in range(args.steps + 3)
    ]

    def one(xb):
        loss = step_loss(xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for xb in batches[:3]:  # warm-up
        one(xb)
    t0 = time.perf_counter()
    for xb in batches[3:]:
        one(xb)
    step_s = (time.perf_counter() - t0) / args.steps

    a, w = batches[0], torch.randn(args.d_in, d_sae)
    torch.mm(a, w)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(a, w)
    gemm_s = (time.perf_counter() - t0) / 10
    print(
        json.dumps(
            {
                "impl": args.impl,
                "d_in": args.d_in,
                "d_sae": d_sae,
                "k": args.k,
                "batch": args.batch,
                "steps_per_s": round(1 / step_s, 3),
                "samples_per_s": round(args.batch / step_s),
                "fvu": round(fvu(), 4),
                "gemm_ms": round(gemm_s * 1e3, 2),
                "step_over_gemm": round(step_s / gemm_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
