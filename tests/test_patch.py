"""The Feature Patcher on the tiny embedded detector: error-term identity, ablation, steering, latent clamp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blueglass.data import CocoDataset, generate_toyworld
from blueglass.errors import ModelError
from blueglass.features.extract import record_lens
from blueglass.features.lens import Lens
from blueglass.features.patch import (
    ClampLatents,
    FeaturePatcher,
    MeanAblate,
    Patch,
    SAEReconstruct,
    Steer,
    ZeroAblate,
)
from blueglass.features.recorder import Recorder, resolve_points
from blueglass.interp.concepts import best_latent_auroc
from blueglass.interp.probes import ProbeSettings, ProbeTarget, train_probes
from blueglass.interp.sae import SAEConfig, SparseAutoencoder
from blueglass.interp.train import TrainSettings, train_saes
from blueglass.models import load_adapter

POINT = "vit.layers.0"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_detector):
    """A toy world split, the tiny detector, its Lens at one point, an SAE and a colour probe on it."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("patch") / "toyworld"
    generate_toyworld(root, {"train": (8, 1, 1), "probe": (240, 1, 3)}, seed=11)
    ds = CocoDataset.load(root / "probe")
    adapter = load_adapter(tiny_detector)
    lens_dir = root.parent / "lens"
    record_lens(adapter, ds, [POINT], lens_dir, block_images=30, blocks_per_shard=1, dtype="float32")
    lens = Lens(lens_dir)
    res = train_saes(
        lens_dir,
        POINT,
        {"topk": SAEConfig(d_in=lens.point(POINT)["d"], d_sae=256, variant="topk", k=16, aux_k=32)},
        TrainSettings(steps=300, batch_size=1024, lr=3e-3),
    )
    probe = train_probes(lens, POINT, [ProbeTarget("color", "color")], ProbeSettings(epochs=5, min_steps=150))
    return {
        "ds": ds,
        "adapter": adapter,
        "lens": lens,
        "sae": res["saes"]["topk"]["sae"],
        "codes": res["saes"]["topk"]["heldout_codes"],
        "meta": res["heldout_meta"],
        "probe": probe["color"],
    }


def _raw(adapter, ds, n=16):
    batch = adapter.preprocess([ds.load_image(r) for r in ds.images[:n]])
    with torch.no_grad():
        out = adapter.forward(batch)
    return out if isinstance(out, torch.Tensor) else torch.cat([v.flatten(1) for v in out.values()], 1)


def test_sae_with_error_term_reproduces_the_clean_model(world):
    adapter, ds = world["adapter"], world["ds"]
    clean = _raw(adapter, ds)
    with FeaturePatcher(adapter, [Patch(POINT, SAEReconstruct(world["sae"], keep_error=True))]):
        same = _raw(adapter, ds)
    assert (same - clean).abs().max().item() <= 1e-5
    with FeaturePatcher(adapter, [Patch(POINT, SAEReconstruct(world["sae"]))]):
        recon = _raw(adapter, ds)
    assert (recon - clean).abs().max().item() > 1e-3  # without the error term it is a real change
    assert torch.equal(_raw(adapter, ds), clean)  # hooks are gone after the context


def test_ablations_change_the_output_and_compose_across_points(world):
    adapter, ds, lens = world["adapter"], world["ds"], world["lens"]
    clean = _raw(adapter, ds)
    with FeaturePatcher(adapter, [Patch(POINT, ZeroAblate())]):
        zero = _raw(adapter, ds)
    mean = torch.tensor(lens.point(POINT)["mean"], dtype=torch.float32)
    with FeaturePatcher(adapter, [Patch(POINT, MeanAblate(mean))]):
        meaned = _raw(adapter, ds)
    assert (zero - clean).abs().max() > 1e-2 and (meaned - zero).abs().max() > 1e-3
    both = [Patch("vit.embeddings", ZeroAblate(), tokens="cls"), Patch(POINT, ZeroAblate(), tokens="patch")]
    with FeaturePatcher(adapter, both) as fp:
        assert sorted(fp.points) == sorted(["vit.embeddings", POINT])
        joint = _raw(adapter, ds)
    assert (joint - clean).abs().max() > 1e-2
    with pytest.raises(ModelError, match="unknown token selection 'pixels'"):
        FeaturePatcher(adapter, [Patch(POINT, ZeroAblate(), tokens="pixels")])
    with pytest.raises(ModelError, match="unknown hook point 'vit.layers.9'"):
        FeaturePatcher(adapter, [Patch("vit.layers.9", ZeroAblate())])


def _acts_at(adapter, ds, patches, images):
    """Activations at POINT as the rest of the model sees them (recorded after the patch hooks)."""
    pts = resolve_points([POINT], adapter.hook_points())
    batch = adapter.preprocess([ds.load_image(r) for r in images])
    with FeaturePatcher(adapter, patches), Recorder(adapter.module, pts, dtype=torch.float32) as rec:
        with torch.no_grad():
            adapter.forward(batch)
        return rec.take()[POINT].reshape(-1, world_d(adapter))


def world_d(adapter):
    return adapter.module.vit_config.hidden_size


def test_steering_by_a_probe_direction_moves_its_logit(world):
    adapter, ds, probe = world["adapter"], world["ds"], world["probe"]
    images = ds.images[-20:]  # the Lens' last shard: held out from the probe's training shards' images
    cls = probe.classes[1]
    direction = torch.from_numpy(probe.direction(cls))
    t = world["lens"].point(POINT)["layout"]["tokens_per_image"]
    mask = torch.zeros(len(images), t, dtype=torch.bool)
    mask[:, 1:] = True  # patch tokens only, by explicit mask
    before = _acts_at(adapter, ds, [], images).numpy()
    after = _acts_at(adapter, ds, [Patch(POINT, Steer(direction, 4.0), tokens=mask)], images).numpy()
    j = probe.classes.index(cls)
    gain = probe.predict(after)[:, j] - probe.predict(before)[:, j]
    patch_rows = mask.reshape(-1).numpy()
    assert (gain[patch_rows] > 0.5).all() and np.allclose(gain[~patch_rows], 0, atol=1e-4)
    others = [i for i in range(len(probe.classes)) if i != j]
    share = (probe.predict(after).argmax(1) == j)[patch_rows].mean()
    assert share > (probe.predict(before).argmax(1) == j)[patch_rows].mean()
    assert others  # a multi-class probe


def test_clamping_a_concept_latent_lowers_that_concepts_probe_accuracy(world):
    adapter, ds, lens, sae, probe = world["adapter"], world["ds"], world["lens"], world["sae"], world["probe"]
    vocab = lens.manifest["concepts"]["color"]
    recovery = best_latent_auroc(world["codes"], world["meta"], {"color": vocab})["color"]["values"]
    value, best = max(recovery.items(), key=lambda kv: kv[1]["auroc"])
    assert best["auroc"] > 0.8
    latents = [j for j, auc in best["top"] if auc > 0.7]  # the latents that carry this colour
    v_idx = vocab.index(value)
    feats, meta = lens.load_point(POINT)
    rows = meta["color"] == v_idx
    x = torch.from_numpy(feats[rows]).float()
    acc_clean = (probe.predict(x.numpy()).argmax(1) == probe.classes.index(v_idx)).mean()
    with torch.no_grad():
        clamped = ClampLatents(sae, latents, 0.0)(x).numpy()
    acc_clamped = (probe.predict(clamped).argmax(1) == probe.classes.index(v_idx)).mean()
    assert acc_clean > 0.6 and acc_clamped < acc_clean - 0.05
    # the same clamp inside the running model changes what the model computes downstream
    clean = _raw(adapter, ds)
    with FeaturePatcher(adapter, [Patch(POINT, ClampLatents(sae, latents, 0.0))]):
        assert (_raw(adapter, ds) - clean).abs().max() > 1e-4


def test_sae_roundtrip_is_what_the_patcher_applies(world, tmp_path):
    sae = world["sae"]
    sae.save(tmp_path / "s")
    loaded = SparseAutoencoder.load(tmp_path / "s")
    x = torch.from_numpy(world["lens"].load_point(POINT)[0][:50]).float()
    assert torch.allclose(SAEReconstruct(loaded)(x), SAEReconstruct(sae)(x), atol=1e-5)


def test_streaming_top_k_equals_brute_force_and_renders(world, tmp_path):
    from PIL import Image

    from blueglass.interp.attribution import class_means, render_latents, top_activations

    sae, lens = world["sae"], world["lens"]
    values, rows, meta = top_activations(sae, lens, POINT, n=7)
    feats, all_meta = lens.load_point(POINT)
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(feats).float())
    bv, br = codes.topk(7, dim=0)
    assert np.allclose(values, bv.numpy(), atol=1e-6)
    fired = bv.numpy() > 0
    assert np.array_equal(np.where(fired, rows, -1), np.where(fired, br.numpy(), -1))
    hit = rows[rows >= 0]
    assert set(meta["row"].tolist()) == set(hit.tolist())
    assert all(
        all_meta[r]["image_id"] == m["image_id"] for r, m in zip(meta["row"], meta["meta"], strict=True)
    )
    ids = sorted(int(k) for k in lens.manifest["categories"])
    means = class_means(sae, lens, POINT, "cover_class", max(ids) + 1)
    c = ids[0]
    brute = codes[torch.from_numpy(all_meta["cover_class"] == c)].mean(0).numpy()
    assert np.allclose(means[c], brute, atol=1e-4)
    images = {r.id: r.path for r in world["ds"].images}
    doc = render_latents(
        sae,
        lens,
        POINT,
        images,
        tmp_path / "latents",
        classes={int(k): v for k, v in lens.manifest["categories"].items()},
        n_latents=3,
        n_tokens=5,
    )
    assert len(doc["top_latents"]) == 3 and doc["class_heatmap"] == "class_heatmap.png"
    for e in doc["top_latents"]:
        img = Image.open(tmp_path / "latents" / e["grid"])
        assert img.height == 72 and img.width >= 72 and np.asarray(img).std() > 5
