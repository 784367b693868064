import json
import shutil

import numpy as np
import pytest
import torch

from blueglass.data import CocoDataset
from blueglass.errors import ModelError
from blueglass.evaluation.runner import evaluate
from blueglass.models import load_adapter, match_points
from blueglass.models.detector import assign_targets
from blueglass.training.vlm import truth_matrix


def test_detector_round_trip_and_hook_points(tiny_detector, toy_root):
    adapter = load_adapter(tiny_detector)
    assert adapter.task == "detection" and adapter.classes == ["circle", "square", "triangle"]
    ds = CocoDataset.load(toy_root / "val")
    images = [ds.load_image(r) for r in ds.images[:3]]
    with torch.no_grad():
        a = adapter.forward(adapter.preprocess(images))
        b = load_adapter(tiny_detector).forward(adapter.preprocess(images))
    assert torch.equal(a["logits"], b["logits"])
    dets = adapter.postprocess(a, [(64, 64)] * 3)
    assert len(dets) == 3 and all(d.boxes_xyxy.shape[1] == 4 for d in dets)
    assert all(set(d.labels.tolist()) <= {1, 2, 3} for d in dets)
    names = [p.name for p in adapter.hook_points()]
    layers = match_points(adapter.hook_points(), ["vit.layers.*"])
    assert [p.name for p in layers] == ["vit.layers.0"]  # the smoke model has one block
    assert layers[0].shape == (1 + 16, 32)  # CLS + 4x4 patches of width 32
    assert "head" in names
    m = evaluate(adapter, ds)
    assert 0.0 <= m["AP50"] <= 1.0 and m["images"] == 10


def test_clip_adapter_zero_shot(tiny_vlm, toy_root):
    adapter = load_adapter(tiny_vlm)
    assert adapter.task == "zero_shot"
    adapter.set_prompts(["a photo of a red object", "a photo of a circle"])
    ds = CocoDataset.load(toy_root / "test_single")
    with torch.no_grad():
        logits = adapter.postprocess(adapter.forward(adapter.preprocess([ds.load_image(ds.images[0])])))
    assert logits.shape == (1, 2)
    assert any(p.name.startswith("vision_model.encoder.layers.0") for p in adapter.hook_points())
    m = evaluate(
        adapter, ds, prompts={"color": "a photo of a {color} object", "shape": "a photo of a {shape}"}
    )
    assert set(m) >= {"accuracy", "color", "shape"} and m["images"] == 12


def test_adapter_errors(tmp_path, tiny_detector):
    with pytest.raises(ModelError, match="model folder not found"):
        load_adapter(tmp_path / "nope")
    folder = tmp_path / "odd"
    shutil.copytree(tiny_detector, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "resnet"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelError,
        match="unsupported model_type 'resnet' .*\\(supported: blueglass-toy-detector, clip, torchvision;",
    ):
        load_adapter(folder)


def test_assign_targets_hand_case():
    # one 16x16 object centred at (20, 36) on a 64 px image with 8 px patches (grid 8)
    cls, box, pos = assign_targets(
        [np.array([[12, 28, 28, 44]], np.float32)], [np.array([2])], grid=8, image_size=64
    )
    hits = torch.nonzero(pos[0]).flatten().tolist()
    # patch centres within ±4 px of the centre: columns 2 (cx 20) and rows 4 (cy 36) → plus none else
    assert hits == [4 * 8 + 2]
    assert cls[0, hits[0]] == 2
    assert torch.allclose(box[0, hits[0]], torch.tensor([20 / 64, 36 / 64, 16 / 64, 16 / 64]))
    assert (cls[0, pos[0].logical_not()] == -1).all()


def test_truth_matrix_hand_case():
    # concept index triples (size, colour, shape); -1 = any, -2 = unused slot
    objs = torch.tensor(
        [[[0, 0, 0], [1, 2, 1]], [[1, 0, 2], [-1, -1, -1]]]
    )  # img0: small c0 s0 + large c2 s1
    desc = torch.tensor(
        [
            [[-1, 0, -1], [-2, -2, -2]],  # "a <colour 0> object": both images
            [[-1, -1, 1], [-1, 2, -1]],  # "a <shape 1> and a <colour 2> object": image 0 only
            [[0, -1, 2], [-2, -2, -2]],  # "a small <shape 2>": neither (image 1's shape 2 is large)
        ]
    )
    assert truth_matrix(desc, objs).tolist() == [[True, True], [True, False], [False, False]]


def test_glob_semantics():
    from blueglass.models.base import glob_match

    assert glob_match("vit.layers.3", "vit.layers.*")
    assert not glob_match("vit.layers.3.mlp", "vit.layers.*")
    assert glob_match("vit.layers.3.mlp", "vit.**.mlp") and glob_match("vit.layers.3.mlp", "**")
    assert glob_match("vit.layers.3", "vit.layers.?") and not glob_match("vit.layers.12", "vit.layers.?")
