"""Sparse autoencoder core: recovery of planted features, aux-k, dead latents, fast path, save/load."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blueglass.interp.sae import (
    SAEConfig,
    SparseAutoencoder,
    TopKEncode,
    aux_k_loss,
    reconstruction_metrics,
    sparse_decode,
)


def planted(n=20000, d=32, n_feat=48, active=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    mags = 1.0 + torch.rand(n, active, generator=g) * 2
    codes = torch.zeros(n, n_feat).scatter_(1, idx, mags)
    x = codes @ dictionary + 0.01 * torch.randn(n, d, generator=g) + 0.5
    return x, dictionary


def fit(sae, x, steps=1500, lr=3e-3, batch=512, seed=0):
    torch.manual_seed(seed)
    sae.init_from_data(x[:4096])
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        xb = x[torch.randint(0, len(x) - 2048, (batch,))]
        out = sae.training_step(xb)
        opt.zero_grad()
        out["loss"].backward()
        sae.constrain_decoder(before_step=True)
        opt.step()
        sae.constrain_decoder(before_step=False)
    return reconstruction_metrics(sae, x[-2048:])


CONFIGS = {
    "relu": {"l1_coeff": 0.3},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "jumprelu": {"l0_coeff": 0.05, "jumprelu_threshold": 0.1},
    "matryoshka": {"k": 4, "matryoshka_prefixes": [32, 96]},
}


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_recovers_planted_features(variant):
    torch.manual_seed(0)
    x, dictionary = planted()
    sae = SparseAutoencoder(
        SAEConfig(d_in=32, d_sae=96, variant=variant, aux_k=16, dead_tokens=20000, **CONFIGS[variant])
    )
    m = fit(sae, x)
    learned = F.normalize(sae.folded_state()["W_dec"], dim=1)
    best_cos = (dictionary @ learned.T).max(1).values
    assert m["fvu"] < 0.1, m
    assert float(best_cos.mean()) > 0.9, (variant, float(best_cos.mean()), m)
    assert m["l0"] < 12, m


def test_same_seed_same_metrics():
    x, _ = planted(n=6000)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, variant="topk", k=4))
        runs.append(fit(sae, x, steps=50))
    assert runs[0] == runs[1]


def test_aux_k_hand_case():
    w_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    pre = torch.tensor([[0.5, 2.0, 1.0], [3.0, -1.0, -0.5]])
    residual = torch.tensor([[0.5, 1.0], [0.0, 0.2]])
    dead = torch.tensor([False, False, True])
    # only latent 2 is dead: ê = relu(pre[:, 2]) · w_dec[2] = [[0.6, 0.8], [0, 0]]
    err = ((0.5 - 0.6) ** 2 + (1.0 - 0.8) ** 2 + 0.0**2 + 0.2**2) / 2
    mean = residual.mean(0)
    var = float((residual - mean).pow(2).sum(-1).mean())
    assert float(aux_k_loss(residual, pre, dead, w_dec, aux_k=4)) == pytest.approx(err / var, rel=1e-6)
    # with two dead latents and aux_k = 1, each row uses only its most active dead latent
    dead2 = torch.tensor([True, False, True])
    e_hat = torch.tensor([[0.6, 0.8], [3.0, 0.0]])
    err2 = float((e_hat - residual).pow(2).sum(-1).mean())
    assert float(aux_k_loss(residual, pre, dead2, w_dec, aux_k=1)) == pytest.approx(err2 / var, rel=1e-6)


def test_dead_fraction_counts_tokens_since_firing():
    sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, variant="topk", k=1, dead_tokens=10, aux_k=0))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0  # only latent 0 can win on inputs along e0
    x = torch.zeros(4, 4)
    x[:, 0] = 1.0
    sae.training_step(x)
    assert sae.dead_fraction() == 0.0  # 4 tokens: nobody has waited 10 yet
    for _ in range(3):
        sae.training_step(x)
    assert sae.tokens_since_fired[0] == 0 and int(sae.tokens_since_fired[1]) == 16
    assert sae.dead_fraction() == pytest.approx(7 / 8)


def test_topk_fast_path_matches_dense_reference():
    torch.manual_seed(0)
    x = torch.randn(64, 16, requires_grad=True)
    w_enc = torch.randn(16, 40, requires_grad=True)
    b_enc = torch.randn(40, requires_grad=True)
    w_dec = torch.randn(40, 16, requires_grad=True)
    vals, idx = TopKEncode.apply(x, w_enc, b_enc, 5)
    fast = sparse_decode(vals, idx, w_dec)
    fast.pow(2).sum().backward()
    g_fast = [t.grad.clone() for t in (x, w_enc, b_enc, w_dec)]
    for t in (x, w_enc, b_enc, w_dec):
        t.grad = None
    pre = x @ w_enc + b_enc
    top = pre.topk(5, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
    dense = codes @ w_dec
    torch.testing.assert_close(fast, dense)
    dense.pow(2).sum().backward()
    for a, t in zip(g_fast, (x, w_enc, b_enc, w_dec), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-3)  # float32 sums in another order


def test_decoder_constraint():
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, variant="relu"))
    sae.W_dec.grad = torch.randn(16, 8)
    sae.constrain_decoder(before_step=True)
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.constrain_decoder(before_step=False)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16))


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_save_load_round_trip(tmp_path, variant):
    x, _ = planted(n=3000)
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=96, variant=variant, **CONFIGS[variant]))
    fit(sae, x, steps=30)
    sae.save(tmp_path / "a", hook_name="vit.layers.2")
    back = SparseAutoencoder.load(tmp_path / "a")
    for k, v in sae.folded_state().items():
        assert torch.equal(back.folded_state()[k], v), k
    back.save(tmp_path / "b", hook_name="vit.layers.2")
    assert (tmp_path / "a" / "sae_weights.safetensors").read_bytes() == (
        tmp_path / "b" / "sae_weights.safetensors"
    ).read_bytes()
    # folding the input scale into the weights keeps what the SAE computes on raw activations
    with torch.no_grad():
        torch.testing.assert_close(back(x[:64]), sae(x[:64]), rtol=1e-4, atol=1e-4)
    assert np.isclose(float(back.input_scale), 1.0)


def test_bad_configs():
    with pytest.raises(ValueError, match=r"k \(200\) must be in 1..d_sae \(64\)"):
        SAEConfig(d_in=8, d_sae=64, variant="topk", k=200)
    with pytest.raises(ValueError, match="unknown SAE variant 'gated'"):
        SAEConfig(d_in=8, d_sae=64, variant="gated")
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        SAEConfig(d_in=8, d_sae=64, variant="matryoshka", k=4, matryoshka_prefixes=[32, 16])
