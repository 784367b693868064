import numpy as np
import pytest

from blueglass.features.align import PATCH, meta_dtype
from blueglass.interp.probes import (
    ProbeTarget,
    auroc_ovr,
    default_targets,
    fit_probe,
    image_split,
    probe_point,
)


def _lens_like(n_images=300, tokens=8, d=16, seed=0, signal=True):
    rng = np.random.default_rng(seed)
    n = n_images * tokens
    meta = np.zeros(n, meta_dtype(["color", "shape", "size"]))
    meta["image_id"] = np.repeat(np.arange(n_images), tokens)
    meta["token_kind"] = PATCH
    meta["color"] = rng.integers(0, 4, n)
    meta["shape"] = -1
    meta["kept"] = rng.random(n) < 0.5
    meta["tp"] = rng.random(n) < 0.5
    meta["pred_box"] = rng.random((n, 4)) * 64
    centres = rng.standard_normal((4, d)) * 3
    feats = rng.standard_normal((n, d)).astype(np.float32)
    if signal:
        feats += centres[meta["color"]]
    feats[:, :4] += (meta["pred_box"] / 64 * 20) if signal else 0
    return feats, meta


def test_probe_finds_a_linear_concept_and_not_noise():
    feats, meta = _lens_like()
    res = fit_probe(feats, meta, ProbeTarget("color", "color"))
    assert (
        res.metrics["accuracy"] > 0.95
        and res.metrics["auroc"] > 0.99
        and res.metrics["balanced_accuracy"] > 0.95
    )
    assert res.metrics["chance"] < 0.4 and res.classes == [0, 1, 2, 3]
    noise = fit_probe(*_lens_like(signal=False), ProbeTarget("color", "color"))
    assert noise.metrics["accuracy"] < 0.4 and 0.4 < noise.metrics["auroc"] < 0.6
    # weights live in raw activation space: they classify unstandardised features directly
    pred = (feats @ res.weight.T + res.bias).argmax(1)
    assert (pred == meta["color"]).mean() > 0.95
    assert np.isclose(np.linalg.norm(res.direction(2)), 1.0)


def test_regression_probe_and_row_selection():
    feats, meta = _lens_like()
    res = fit_probe(feats, meta, ProbeTarget("pred_box", "pred_box", kind="regression", kept_only=True))
    assert res.metrics["r2"] > 0.8
    assert res.n_train + res.n_test == int(meta["kept"].sum())
    out = probe_point(feats, meta, default_targets(meta.dtype.names))
    assert "color" in out and "shape" not in out  # no shape labels at all → no probe


def test_split_is_by_image():
    ids = np.repeat(np.arange(500), 10)
    test = image_split(ids)
    per_image = test.reshape(500, 10)
    assert (per_image.all(1) | ~per_image.any(1)).all()
    assert 0.1 < test.mean() < 0.3


def test_auroc_hand_case():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    labels = np.array([0, 0, 1, 1])
    # class 0 scores: positives 0.9, 0.8 vs negatives 0.3, 0.5 → AUROC 1; class 1 mirrors it
    assert auroc_ovr(scores, labels, np.array([0, 1])) == pytest.approx(1.0)
    tied = np.array([[0.5, 0.5]] * 4)
    assert auroc_ovr(tied, labels, np.array([0, 1])) == pytest.approx(0.5)
