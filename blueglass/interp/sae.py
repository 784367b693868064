"""Sparse autoencoders: ReLU + L1, TopK, BatchTopK, JumpReLU and Matryoshka, sharing one core.

Shared mechanics (``SparseAutoencoder``):

* encoder ``W_enc [d_in, d_sae]``, ``b_enc``; decoder ``W_dec [d_sae, d_in]`` with unit-norm rows, kept so
  by :meth:`constrain_decoder` (remove the gradient component parallel to each row before the optimiser
  step, renormalise after it); ``b_dec`` initialised from the data (mean or geometric median) and
  subtracted from the input before encoding;
* inputs are scaled by one constant so their mean norm is ``sqrt(d_in)``; :meth:`folded_state` folds that
  scale into the weights at save time, so a saved SAE takes raw activations;
* aux-k (TopK family): the ``aux_k`` most active *dead* latents (no firing in the last ``dead_tokens``
  tokens) reconstruct the residual ``x − x̂`` (x̂ detached); the loss is that error normalised by the
  residual's variance, as in Gao et al. (2024);
* TopK-style encoders select the exact top-k with two small top-k's instead of one over the whole row
  (:func:`topk_exact`), back-propagate only through the ``k`` selected latents per row
  (:class:`TopKEncode`) and decode sparsely (:class:`SparseDecode`: ``embedding_bag`` forward, a sampled
  product and a pre-sorted transposed CSR backward), never a dense ``[batch, d_sae]`` backward.

On disk: SAELens' layout — ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc, b_enc, W_dec, b_dec`` and
``threshold`` for JumpReLU / BatchTopK).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# CSR tensors are "beta" in torch and say so once per process; the products used here are tested.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

Variant = Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
VARIANTS: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    variant: Variant = "topk"
    k: int = 32  # active latents per token (topk, batchtopk, matryoshka)
    l1_coeff: float = 5.0  # relu: weight of the L1 penalty (codes × decoder-row norms)
    l0_coeff: float = 0.1  # jumprelu: weight of the (straight-through) L0 penalty
    aux_k: int = 256  # dead latents used by the aux-k loss (0 = off)
    aux_coeff: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent that has not fired for this many tokens is dead
    jumprelu_threshold: float = 0.01  # initial threshold
    jumprelu_bandwidth: float = 0.05  # straight-through rectangle width
    matryoshka_prefixes: list[int] = field(default_factory=list)  # nested dictionary sizes (last = d_sae)
    batchtopk_momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown SAE variant {self.variant!r} (variants: {', '.join(VARIANTS)})")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError("d_in and d_sae must be positive")
        if self.variant in ("topk", "batchtopk", "matryoshka") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k ({self.k}) must be in 1..d_sae ({self.d_sae})")
        if self.variant == "matryoshka":
            p = self.matryoshka_prefixes or [self.d_sae]
            if sorted(p) != p or p[-1] != self.d_sae or p[0] < 1:
                raise ValueError(f"matryoshka_prefixes {p} must increase and end at d_sae ({self.d_sae})")
            self.matryoshka_prefixes = p


def _chunk_size(d_sae: int, k: int) -> int:
    """Chunk width for :func:`topk_exact` (1 = plain ``torch.topk``): ~sqrt(d_sae / k), dividing d_sae."""
    if d_sae < 8 * k:
        return 1
    target = math.sqrt(d_sae / k)
    divisors = [c for c in range(2, 65) if d_sae % c == 0 and d_sae // c >= 2 * k]
    return min(divisors, key=lambda c: abs(math.log(c / target)), default=1)


def topk_exact(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-row top-``k`` of ``pre [rows, n]`` as (values, indices), in no particular order.

    Two small top-k's instead of one over the whole row (``torch.topk`` on a CPU costs about as much per
    element as a d_in=256 GEMM). Columns are split into ``n / c`` strided chunks ``{j, j + n/c, …}``; every
    element of the row's top-k lies in one of the ``k`` chunks with the largest maxima (were it outside,
    those ``k`` maxima would be ``k`` larger elements), so the top-k of those ``k · c`` candidates is the
    row's top-k (ties aside: any unselected element is ≤ every selected one). Measured on CPUs only:
    elsewhere (and for narrow rows) it is plain ``torch.topk``.
    """
    rows, n = pre.shape
    c = _chunk_size(n, k)
    if c == 1 or pre.device.type != "cpu":
        return pre.topk(k, dim=-1, sorted=False)
    nc = n // c
    chunk_max = pre.reshape(rows, c, nc).amax(1)  # elementwise max over c contiguous slices: vectorised
    chunks = chunk_max.topk(k, dim=-1, sorted=False).indices  # [rows, k]
    cand = (chunks.unsqueeze(-1) + torch.arange(0, n, nc, device=pre.device)).view(rows, k * c)
    vals, pos = pre.gather(1, cand).topk(k, dim=-1, sorted=False)
    return vals, cand.gather(1, pos)


class SparsePattern:
    """The (row, latent) pairs of ``idx [rows, k]``, also sorted by latent (stable, so rows ascend)."""

    def __init__(self, idx: torch.Tensor, n_cols: int):
        rows, k = idx.shape
        flat = idx.reshape(-1)
        self.idx, self.n_cols = idx, n_cols
        # stable radix sort on the narrowest integer type (int16 sorts ~3x faster than int64 on a CPU)
        key = flat.to(torch.int16 if n_cols <= torch.iinfo(torch.int16).max else torch.int32)
        self.order = key.sort(stable=True).indices
        self.t_crow = torch.zeros(n_cols + 1, dtype=torch.long, device=idx.device)
        self.t_crow[1:] = torch.bincount(flat, minlength=n_cols).cumsum(0)
        self.t_col = self.order // k
        self._ones: torch.Tensor | None = None  # the pattern with ones, for sampled products

    def csr(self, vals: torch.Tensor) -> torch.Tensor:
        """``[rows, n_cols]`` CSR with ``vals`` at the pattern (columns in ``idx``'s order)."""
        rows, k = self.idx.shape
        crow = torch.arange(0, rows * k + 1, k, device=vals.device)
        return torch.sparse_csr_tensor(
            crow, self.idx.reshape(-1), vals.reshape(-1), size=(rows, self.n_cols), check_invariants=False
        )

    def csr_t(self, vals: torch.Tensor) -> torch.Tensor:
        """The transpose ``[n_cols, rows]`` as CSR (no conversion: the sort was done once)."""
        return torch.sparse_csr_tensor(
            self.t_crow,
            self.t_col,
            vals.reshape(-1)[self.order],
            size=(self.n_cols, self.idx.shape[0]),
            check_invariants=False,
        )

    def sampled_mm(self, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        """``(a @ b_tᵀ)[r, idx[r, j]]`` as ``[rows, k]``, computing only those entries."""
        if self._ones is None or self._ones.dtype != a.dtype:
            self._ones = self.csr(torch.ones(self.idx.shape, dtype=a.dtype, device=a.device))
        return torch.sparse.sampled_addmm(self._ones, a, b_t.t(), beta=0.0).values().view(self.idx.shape)


class TopKEncode(torch.autograd.Function):
    """``top-k(relu((x − b_dec) W + b))`` as (values, indices); backward through the k selected only.

    ``TopKEncode.apply(x, w_enc, b_enc, k[, b_dec, patterns])``: ``b_dec`` (optional) is subtracted from
    ``x`` inside; ``patterns`` (optional list) receives the :class:`SparsePattern` of the indices, to be
    shared with :func:`sparse_decode`. Forward: one dense GEMM and :func:`topk_exact`. Backward, with ``g``
    the relu-gated value gradient: ``∂W_enc = (CSRᵀ(g) @ xc)ᵀ``, ``∂b_enc`` a scatter-add over the
    selected pairs, ``∂x = CSR(g) @ W_encᵀ`` (only when ``x`` needs it) and ``∂b_dec = −W_enc ∂b_enc``
    (the column sum of ``−∂x``, without forming ``∂x``). Nothing ``[batch, d_sae]`` is touched backward.
    """

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, k: int, b_dec=None, patterns=None):
        xc = x if b_dec is None else x - b_dec
        pre = torch.addmm(b_enc, xc, w_enc)  # the one dense GEMM
        vals, idx = topk_exact(pre, k)
        del pre
        vals = vals.clamp_min_(0)
        pattern = SparsePattern(idx, w_enc.shape[1])
        if patterns is not None:
            patterns.append(pattern)
        ctx.pattern = pattern
        ctx.save_for_backward(xc, w_enc, vals)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx):
        xc, w_enc, vals = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need = ctx.needs_input_grad
        need_bdec = len(need) > 4 and need[4]
        g = grad_vals * (vals > 0)  # relu gate
        grad_x = grad_w = grad_b = grad_bdec = None
        if need[2] or need_bdec:
            grad_b = torch.zeros(w_enc.shape[1], dtype=g.dtype, device=g.device).index_add_(
                0, pattern.idx.reshape(-1), g.reshape(-1)
            )
        if need[1]:
            grad_w = (pattern.csr_t(g) @ xc).t()  # only the selected columns receive gradient
        if need[0]:
            grad_x = pattern.csr(g) @ w_enc.t()
        if need_bdec:
            grad_bdec = -(w_enc @ grad_b)
        if not need[2]:
            grad_b = None
        return (grad_x, grad_w, grad_b, None, grad_bdec, None)[: len(need)]


class SparseDecode(torch.autograd.Function):
    """``Σ_j vals_j · W_dec[idx_j]`` from (values, indices) without a dense ``[batch, d_sae]``.

    Forward: ``embedding_bag``. Backward: the values' gradient ``<grad_out, W_dec[idx_j]>`` by a sampled
    product at the k pairs per row only, and ``∂W_dec = CSRᵀ(vals) @ grad_out``.
    """

    @staticmethod
    def forward(ctx, vals, idx, w_dec, pattern):
        ctx.pattern = pattern
        ctx.save_for_backward(vals, w_dec)
        return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        vals, w_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_out = grad_out.contiguous()
        grad_vals = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_vals = pattern.sampled_mm(grad_out, w_dec)
        if ctx.needs_input_grad[2]:
            grad_w = pattern.csr_t(vals) @ grad_out
        return grad_vals, None, grad_w, None


def sparse_decode(
    vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor, pattern: SparsePattern | None = None
) -> torch.Tensor:
    """``Σ_j vals_j · W_dec[idx_j]`` without materialising ``[batch, d_sae]`` (indices in any order)."""
    if pattern is None:
        pattern = SparsePattern(idx, w_dec.shape[0])
    return SparseDecode.apply(vals.contiguous(), idx, w_dec, pattern)


class SparseReconLoss(torch.autograd.Function):
    """``mean_rows ‖Σ_j vals_j W_dec[idx_j] + b_dec − xs‖²`` and the (non-differentiable) error ``x̂ − xs``.

    :class:`SparseDecode` with the squared error fused in: one ``[rows, d_in]`` error tensor, formed in
    place, is all the loss touches, forward and backward (``∂x̂ = 2 (x̂ − xs) / rows``).
    """

    @staticmethod
    def forward(ctx, vals, idx, w_dec, b_dec, xs, pattern):
        diff = F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")
        diff.add_(b_dec).sub_(xs)
        flat = diff.view(-1)
        loss = torch.dot(flat, flat) / diff.shape[0]
        ctx.pattern = pattern
        ctx.save_for_backward(vals, w_dec, diff)
        ctx.mark_non_differentiable(diff)
        return loss, diff

    @staticmethod
    def backward(ctx, grad_loss, _grad_diff):
        vals, w_dec, diff = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_out = diff * (2 * grad_loss / diff.shape[0])
        need = ctx.needs_input_grad
        grad_vals = pattern.sampled_mm(grad_out, w_dec) if need[0] else None
        grad_w = pattern.csr_t(vals) @ grad_out if need[2] else None
        grad_b = grad_out.sum(0) if need[3] else None
        grad_xs = -grad_out if need[4] else None
        return grad_vals, None, grad_w, grad_b, grad_xs, None


class _JumpStep(torch.autograd.Function):
    """Heaviside step H(z − θ) with a rectangle straight-through gradient for θ (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx, z, log_theta, bandwidth):
        theta = log_theta.exp()
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        rect = ((z - theta).abs() < ctx.bandwidth / 2).to(z.dtype) / ctx.bandwidth
        grad_log_theta = (-(theta * rect) * grad).sum(0)
        return None, grad_log_theta, None


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.d_in, cfg.d_sae
        w = torch.randn(m, d)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.t().clone())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long))
        if cfg.variant == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((m,), math.log(cfg.jumprelu_threshold)))
        if cfg.variant == "batchtopk":
            self.register_buffer("threshold", torch.zeros(m))
            self.register_buffer("threshold_seen", torch.zeros((), dtype=torch.bool))

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_from_data(
        self, x: torch.Tensor, method: Literal["mean", "geometric_median"] = "geometric_median"
    ) -> None:
        """Set the input scale (mean norm → sqrt(d_in)) and ``b_dec`` from a sample of activations."""
        x = x.float()
        self.input_scale.fill_(math.sqrt(self.cfg.d_in) / x.norm(dim=1).mean().clamp_min(1e-8))
        xs = x * self.input_scale
        centre = xs.mean(0)
        if method == "geometric_median":  # Weiszfeld iterations
            for _ in range(50):
                w = 1.0 / (xs - centre).norm(dim=1).clamp_min(1e-6)
                new = (w[:, None] * xs).sum(0) / w.sum()
                if (new - centre).norm() < 1e-6:
                    break
                centre = new
        self.b_dec.copy_(centre)

    # ---------------------------------------------------------------- forward
    def _pre(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``[batch, d_sae]`` for raw activations (inference)."""
        xs = x * self.input_scale
        v = self.cfg.variant
        if v == "relu":
            return F.relu(self._pre(xs))
        if v == "jumprelu":
            pre = self._pre(xs)
            return pre * (pre > self.log_threshold.exp())
        if v == "batchtopk" and bool(self.threshold_seen):
            pre = F.relu(self._pre(xs))
            return pre * (pre > self.threshold)
        vals, idx = self._pre(xs).topk(self.cfg.k, dim=-1)
        return torch.zeros(x.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=x.device).scatter_(
            1, idx, vals.clamp_min(0)
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction from dense codes."""
        return (codes @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---------------------------------------------------------------- training
    def training_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms and statistics for one batch of raw activations (``loss`` is the total)."""
        cfg = self.cfg
        xs = x.float() * self.input_scale
        xc = xs - self.b_dec if cfg.variant not in ("topk", "matryoshka") else None
        out: dict[str, torch.Tensor] = {}
        mse = None
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
        if cfg.variant in ("topk", "matryoshka"):
            patterns: list[SparsePattern] = []
            vals, idx = TopKEncode.apply(xs, self.W_enc, self.b_enc, cfg.k, self.b_dec, patterns)
            pattern = patterns[0]
            if cfg.variant == "topk":
                recon, diff = SparseReconLoss.apply(vals, idx, self.W_dec, self.b_dec, xs, pattern)
                mse = recon.detach()
            else:
                recon, diff, mse = self._matryoshka_loss(xs, vals, idx, pattern)
            x_hat = None  # the error x̂ − xs is `diff`
            with torch.no_grad():
                active = (vals > 0).float()
                fired = (
                    torch.zeros(cfg.d_sae, device=x.device).index_add_(0, idx.reshape(-1), active.reshape(-1))
                    > 0
                )
                out["l0"] = active.sum(-1).mean()
            pre_for_aux = None
        elif cfg.variant == "batchtopk":
            pre = F.relu(xc @ self.W_enc + self.b_enc)
            flat_vals, flat_idx = pre.flatten().topk(cfg.k * x.shape[0])
            codes = torch.zeros_like(pre).flatten().scatter(0, flat_idx, flat_vals).view_as(pre)
            x_hat = codes @ self.W_dec + self.b_dec
            recon = (x_hat - xs).pow(2).sum(-1).mean()
            active = codes > 0
            fired |= active.any(0)
            out["l0"] = active.sum(-1).float().mean()
            with torch.no_grad():  # inference threshold: EMA of the smallest kept activation
                kept_min = (
                    flat_vals[flat_vals > 0].min() if (flat_vals > 0).any() else flat_vals.new_zeros(())
                )
                mom = cfg.batchtopk_momentum if bool(self.threshold_seen) else 0.0
                self.threshold.mul_(mom).add_((1 - mom) * kept_min)
                self.threshold_seen.fill_(True)
            pre_for_aux = pre
        elif cfg.variant == "relu":
            codes = F.relu(xc @ self.W_enc + self.b_enc)
            x_hat = codes @ self.W_dec + self.b_dec
            recon = (x_hat - xs).pow(2).sum(-1).mean()
            sparsity = (codes * self.W_dec.norm(dim=1)).sum(-1).mean()
            out["sparsity"] = sparsity
            recon = recon + cfg.l1_coeff * sparsity
            fired |= (codes > 0).any(0)
            out["l0"] = (codes > 0).sum(-1).float().mean()
            pre_for_aux = None
        else:  # jumprelu
            pre = xc @ self.W_enc + self.b_enc
            step = _JumpStep.apply(pre, self.log_threshold, cfg.jumprelu_bandwidth)
            codes = F.relu(pre) * step
            x_hat = codes @ self.W_dec + self.b_dec
            recon = (x_hat - xs).pow(2).sum(-1).mean()
            l0 = step.sum(-1).mean()
            out["sparsity"] = l0
            recon = recon + cfg.l0_coeff * l0
            fired |= (codes > 0).any(0)
            out["l0"] = (codes > 0).sum(-1).float().mean()
            pre_for_aux = None
        with torch.no_grad():
            self.tokens_since_fired.add_(x.shape[0]).mul_(~fired)
        out["mse"] = mse if mse is not None else (x_hat.detach() - xs).pow(2).sum(-1).mean()
        loss = recon
        if cfg.aux_k and cfg.variant in ("topk", "batchtopk", "matryoshka"):
            dead = self.tokens_since_fired >= cfg.dead_tokens
            if dead.any():
                if pre_for_aux is not None:
                    pre = pre_for_aux
                else:
                    pre = torch.addmm(self.b_enc, xs - self.b_dec if xc is None else xc, self.W_enc)
                residual = xs - x_hat.detach() if x_hat is not None else -diff
                aux = aux_k_loss(residual, pre, dead, self.W_dec, cfg.aux_k)
                out["aux"] = aux
                loss = loss + cfg.aux_coeff * aux
        out["loss"] = loss
        return out

    def _matryoshka_loss(self, xs, vals, idx, pattern):
        """Mean reconstruction loss over nested dictionaries: latents ``< m`` for each prefix ``m``."""
        losses = []
        diff = None
        for m in self.cfg.matryoshka_prefixes:
            v = vals if m == self.cfg.d_sae else vals * (idx < m)
            loss, diff = SparseReconLoss.apply(v, idx, self.W_dec, self.b_dec, xs, pattern)
            losses.append(loss)
        return torch.stack(losses).mean(), diff, losses[-1].detach()

    @torch.no_grad()
    def constrain_decoder(self, before_step: bool) -> None:
        """Before the optimiser step: drop the gradient parallel to each decoder row; after: renormalise."""
        if before_step:
            if self.W_dec.grad is not None:
                parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
                self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)
        else:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def dead_fraction(self) -> float:
        """Latents that did not fire in the last ``dead_tokens`` tokens ÷ number of latents."""
        return float((self.tokens_since_fired >= self.cfg.dead_tokens).float().mean())

    # ---------------------------------------------------------------- saving
    @torch.no_grad()
    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights taking raw activations: the input scale folded into W_enc, W_dec, b_dec (and thresholds stay)."""
        s = self.input_scale
        state = {
            "W_enc": (self.W_enc * s).contiguous(),
            "b_enc": self.b_enc.clone(),
            "W_dec": (self.W_dec / s).contiguous(),
            "b_dec": (self.b_dec / s).contiguous(),
        }
        if self.cfg.variant == "jumprelu":
            state["threshold"] = self.log_threshold.exp().clone()
        if self.cfg.variant == "batchtopk":
            state["threshold"] = self.threshold.clone()
        return state

    def save(self, folder: str | Path, **extra) -> Path:
        """SAELens layout: ``cfg.json`` + ``sae_weights.safetensors`` (raw-activation weights)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arch = {
            "relu": "standard",
            "topk": "topk",
            "batchtopk": "jumprelu",
            "jumprelu": "jumprelu",
            "matryoshka": "topk",
        }
        cfg = {
            "architecture": arch[self.cfg.variant],
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "activation_fn_kwargs": {"k": self.cfg.k} if self.cfg.variant in ("topk", "matryoshka") else {},
            "blueglass": {**asdict(self.cfg), **extra},
        }
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(self.folded_state(), str(folder / "sae_weights.safetensors"))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SparseAutoencoder:
        """Load a folder written by :meth:`save` (weights already take raw activations: scale 1)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "cfg.json").read_text())["blueglass"]
        known = set(SAEConfig.__dataclass_fields__)
        sae = cls(SAEConfig(**{k: v for k, v in meta.items() if k in known}))
        state = load_file(str(folder / "sae_weights.safetensors"))
        with torch.no_grad():
            for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, k).copy_(state[k])
            if "threshold" in state and sae.cfg.variant == "jumprelu":
                sae.log_threshold.copy_(state["threshold"].log())
            if "threshold" in state and sae.cfg.variant == "batchtopk":
                sae.threshold.copy_(state["threshold"])
                sae.threshold_seen.fill_(True)
        return sae


def aux_k_loss(
    residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, w_dec: torch.Tensor, aux_k: int
) -> torch.Tensor:
    """Reconstruct the residual ``x − x̂`` from the ``aux_k`` most active dead latents.

    Returns ``‖e − ê‖² / ‖e − mean(e)‖²`` (batch means), the normalised MSE of Gao et al. (2024).
    """
    k = min(aux_k, int(dead.sum()))
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(k, dim=-1)
    e_hat = sparse_decode(F.relu(vals), idx, w_dec)
    err = (e_hat - residual).pow(2).sum(-1).mean()
    var = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return err / var


def reconstruction_metrics(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    """Held-out ``mse``, ``fvu`` (fraction of variance unexplained), ``explained_variance`` and ``l0``."""
    with torch.no_grad():
        codes = sae.encode(x.float())
        x_hat = sae.decode(codes)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        var = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        fvu = float(mse / var)
        return {
            "mse": float(mse),
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "l0": float((codes > 0).sum(-1).float().mean()),
        }
