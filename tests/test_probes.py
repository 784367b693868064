import numpy as np
import pytest

from blueglass.features.align import PATCH, meta_dtype
from blueglass.features.lens import LensWriter, merge_parts, write_manifest
from blueglass.interp.probes import (
    ProbeSettings,
    ProbeTarget,
    auroc_ovr,
    default_targets,
    image_split,
    train_probes,
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


def write_lens(root, feats, meta, images_per_block=50):
    """A real Lens (one point "p") from token rows of consecutive images."""
    w = LensWriter(root, {"p": feats.shape[1]}, blocks_per_shard=2, dtype="float32")
    block_of = meta["image_id"] // images_per_block
    for b in np.unique(block_of):
        rows = block_of == b
        w.add_block(int(b), {"p": feats[rows]}, {"p": meta[rows]})
    write_manifest(
        root,
        {
            "points": merge_parts([w.close()], {"p": {"d": feats.shape[1], "dtype": "float32"}}),
            "meta_fields": list(meta.dtype.names),
        },
    )
    return root


def test_probe_finds_a_linear_concept_and_not_noise(tmp_path):
    feats, meta = _lens_like()
    res = train_probes(write_lens(tmp_path / "a", feats, meta), "p", [ProbeTarget("color", "color")])["color"]
    assert (
        res.metrics["accuracy"] > 0.95
        and res.metrics["auroc"] > 0.99
        and res.metrics["balanced_accuracy"] > 0.95
    )
    assert res.metrics["chance"] < 0.4 and res.classes == [0, 1, 2, 3]
    noise_lens = write_lens(tmp_path / "b", *_lens_like(signal=False))
    noise = train_probes(noise_lens, "p", [ProbeTarget("color", "color")])["color"]
    assert noise.metrics["accuracy"] < 0.4 and 0.4 < noise.metrics["auroc"] < 0.6
    # weights live in raw activation space: they classify unstandardised features directly
    pred = (feats @ res.weight.T + res.bias).argmax(1)
    assert (pred == meta["color"]).mean() > 0.95
    assert np.isclose(np.linalg.norm(res.direction(2)), 1.0)
    # same seed → same probe
    again = train_probes(tmp_path / "a", "p", [ProbeTarget("color", "color")])["color"]
    assert again.metrics == res.metrics and np.array_equal(again.weight, res.weight)


def test_regression_probe_row_selection_and_all_targets_in_one_pass(tmp_path):
    feats, meta = _lens_like()
    lens = write_lens(tmp_path / "a", feats, meta)
    out = train_probes(lens, "p", default_targets(meta.dtype.names), ProbeSettings(epochs=40))
    assert "color" in out and "shape" not in out  # no shape labels at all → no probe
    box = out["pred_box"]
    assert box.metrics["r2"] > 0.8 and box.weight.shape == (4, 16)
    assert box.n_train + box.n_test == int(meta["kept"].sum())
    # regression weights predict the target in its own units from raw features
    pred = feats[meta["kept"]] @ box.weight.T + box.bias
    target = meta["pred_box"][meta["kept"]]
    assert 1 - ((pred - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum() > 0.8
    assert out["color"].metrics["accuracy"] > 0.95


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
