"""The TopK fast path's kernels against plain dense PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from blueglass.interp.sae import SparsePattern, TopKEncode, _chunk_size, sparse_decode, topk_exact


@pytest.mark.parametrize(
    "rows,n,k",
    [(257, 2048, 32), (64, 4096, 32), (33, 6144, 32), (50, 40, 5), (20, 96, 32), (31, 1000, 7), (8, 64, 64)],
)
def test_topk_exact_is_torch_topk(rows, n, k):
    g = torch.Generator().manual_seed(n + k)
    for pre in (torch.randn(rows, n, generator=g), torch.rand(rows, n, generator=g) * 10 - 9):
        vals, idx = topk_exact(pre, k)
        ref = pre.topk(k, dim=-1)
        assert idx.shape == (rows, k)
        # ties have probability ~0 here, so the index sets must be identical
        assert torch.equal(idx.sort(-1).values, ref.indices.sort(-1).values)
        assert torch.equal(vals, pre.gather(1, idx))
        assert torch.equal(vals.sort(-1, descending=True).values, ref.values)


def test_topk_exact_with_clustered_maxima():
    """Adversarial: the whole top-k sits in one strided chunk."""
    n, k = 2048, 32
    c = _chunk_size(n, k)
    assert c > 1
    pre = torch.randn(16, n)
    pre[:, 5 :: n // c] += 100.0  # all c members of chunk 5 are in the top-k
    vals, idx = topk_exact(pre, k)
    assert torch.equal(idx.sort(-1).values, pre.topk(k, dim=-1).indices.sort(-1).values)


def test_topk_exact_ties_give_a_valid_top_k():
    pre = torch.randint(0, 5, (64, 2048)).float()
    vals, idx = topk_exact(pre, 32)
    assert all(len(set(r.tolist())) == 32 for r in idx)
    unselected = pre.scatter(1, idx, float("-inf")).amax(-1)
    assert bool((vals.amin(-1) >= unselected).all())


def test_sparse_pattern_products():
    torch.manual_seed(0)
    rows, n, k, d = 40, 300, 6, 12
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(rows)])  # unsorted columns
    vals = torch.randn(rows, k)
    p = SparsePattern(idx, n)
    dense = torch.zeros(rows, n).scatter(1, idx, vals)
    x, a, w = torch.randn(rows, d), torch.randn(rows, d), torch.randn(n, d)
    torch.testing.assert_close(p.csr_t(vals) @ x, dense.t() @ x)
    torch.testing.assert_close(p.csr(vals) @ w, dense @ w)
    torch.testing.assert_close(p.sampled_mm(a, w), (a @ w.t()).gather(1, idx))


def test_topk_encode_with_b_dec_matches_dense_reference():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    b_dec = torch.randn(16, requires_grad=True)
    w_enc = torch.randn(16, 512, requires_grad=True)
    b_enc = torch.randn(512, requires_grad=True)
    w_dec = torch.randn(512, 16, requires_grad=True)
    patterns = []
    vals, idx = TopKEncode.apply(x, w_enc, b_enc, 8, b_dec, patterns)
    fast = sparse_decode(vals, idx, w_dec, patterns[0]) + b_dec
    (fast - x).pow(2).sum().backward()
    params = (b_dec, w_enc, b_enc, w_dec)
    g_fast = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    pre = (x - b_dec) @ w_enc + b_enc
    top = pre.topk(8, dim=-1)
    dense = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values)) @ w_dec + b_dec
    torch.testing.assert_close(fast, dense)
    (dense - x).pow(2).sum().backward()
    for a, t in zip(g_fast, params, strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-3)


def test_topk_exact_on_a_non_contiguous_input():
    pre = torch.randn(2048, 100).t()  # [100, 2048], column-major
    vals, idx = topk_exact(pre, 32)
    assert torch.equal(idx.sort(-1).values, pre.topk(32, dim=-1).indices.sort(-1).values)
