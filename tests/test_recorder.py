"""Feature Recorder and per-token metadata."""

import numpy as np
import pytest
import torch

from blueglass.data import Annotation, CocoDataset, ImageRecord
from blueglass.errors import ModelError
from blueglass.features.align import CLS, PATCH, TokenPredictions, image_metadata
from blueglass.features.recorder import Recorder, resolve_points
from blueglass.models import load_adapter


@pytest.fixture(scope="module")
def detector_and_batch(tiny_detector, toy_root):
    adapter = load_adapter(tiny_detector)
    ds = CocoDataset.load(toy_root / "val")
    return adapter, adapter.preprocess([ds.load_image(r) for r in ds.images[:4]])


def test_hooks_leave_outputs_bit_identical(detector_and_batch):
    adapter, batch = detector_and_batch
    with torch.no_grad():
        plain = adapter.forward(batch)
        points = resolve_points(
            ["vit.layers.*", "head", "vit.layers.0:input"], adapter.hook_points(), adapter.aliases()
        )
        with Recorder(adapter.module, points) as rec:
            hooked = adapter.forward(batch)
        acts = rec.take()
        with Recorder(adapter.module, []) as none:
            assert none._handles == []  # no points: nothing registered
            again = adapter.forward(batch)
    for k in plain:
        assert torch.equal(plain[k], hooked[k]) and torch.equal(plain[k], again[k])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in adapter.module.modules())
    assert set(acts) == {"vit.layers.0", "head", "vit.layers.0:input"}


def test_recorded_rows_equal_module_outputs(detector_and_batch):
    adapter, batch = detector_and_batch
    points = resolve_points(["resid.*", "vit.layers.0:input"], adapter.hook_points(), adapter.aliases())
    with torch.no_grad(), Recorder(adapter.module, points, dtype=torch.float32) as rec:
        adapter.forward(batch)
        acts = rec.take()
        direct = adapter.module.vit(pixel_values=batch["pixel_values"], output_hidden_states=True)
    # hidden_states[i + 1] is the output of block i; the final layernorm output is last_hidden_state
    assert torch.equal(acts["vit.layers.0"], direct.hidden_states[1])
    assert torch.equal(acts["vit.layernorm"], direct.last_hidden_state)
    assert torch.equal(acts["vit.layers.0:input"], direct.hidden_states[0])  # the embeddings
    with torch.no_grad(), Recorder(adapter.module, points) as rec16:
        adapter.forward(batch)
        assert torch.equal(rec16.take()["vit.layers.0"], direct.hidden_states[1].half())


def test_unknown_point_lists_valid_ones(detector_and_batch):
    adapter, _ = detector_and_batch
    with pytest.raises(
        ModelError, match=r"unknown hook point 'vit.blocks.\*' \(valid: vit, vit.embeddings.*aliases: resid.0"
    ):
        resolve_points(["vit.blocks.*"], adapter.hook_points(), adapter.aliases())


def _record():
    anns = (
        Annotation(
            1,
            7,
            1,
            (0.0, 0.0, 16.0, 16.0),
            256.0,
            attributes={"color": "red", "shape": "circle", "size": "small"},
        ),
        Annotation(
            2,
            7,
            2,
            (32.0, 32.0, 32.0, 32.0),
            1024.0,
            attributes={"color": "blue", "shape": "square", "size": "large"},
        ),
    )
    return ImageRecord(7, "x.png", None, 64, 64, None, anns)


CONCEPTS = {"color": ["red", "blue"], "shape": ["circle", "square"], "size": ["small", "large"]}


def test_metadata_hand_case():
    # grid 2 on a 64 px image: patch centres (16,16) (48,16) (16,48) (48,48); tokens = CLS + 4 patches
    preds = TokenPredictions(
        boxes_xyxy=np.array([[0, 0, 16, 8], [0, 0, 16, 16], [32, 32, 64, 64], [40, 40, 64, 64]], np.float32),
        scores=np.array([0.9, 0.8, 0.7, 0.95], np.float32),
        labels=np.array([1, 1, 1, 2]),
        kept=np.array([True, True, True, True]),
    )
    m = image_metadata(_record(), 5, 2, CONCEPTS, preds, iou_threshold=0.5)
    assert m["token_kind"].tolist() == [CLS, PATCH, PATCH, PATCH, PATCH]
    assert m["row"].tolist() == [-1, 0, 0, 1, 1] and m["col"].tolist() == [-1, 0, 1, 0, 1]
    np.testing.assert_allclose(m["iou"], [0, 0.5, 1.0, 1.0, 0.5625])
    assert m["gt_index"].tolist() == [-1, 0, 0, 1, 1]
    assert m["gt_class"].tolist() == [-1, 1, 1, 2, 2]
    # by score: token 4 (0.95, class 2, IoU .5625) takes GT 1; token 1 (0.9, IoU .5) takes GT 0;
    # token 2 (0.8) finds GT 0 taken → FP; token 3 is class 1 on a class-2 object → FP
    assert m["tp"].tolist() == [0, 1, 0, 0, 1]
    assert m["pred_class"].tolist() == [-1, 1, 1, 1, 2]
    # patch centre (48,48) lies in object 1 (32..64); (16,16) is on object 0's edge → outside (half-open)
    assert m["cover_index"].tolist() == [-1, -1, -1, -1, 1]
    assert m["color"].tolist() == [-1, -1, -1, -1, 1] and m["size"].tolist() == [-1, -1, -1, -1, 1]


def test_metadata_iou_threshold_and_single_object_cls():
    rec = _record()
    # two DETR-style query tokens (no grid); query 0 sits on object 0 with IoU 0.75
    preds = TokenPredictions(
        np.array([[0, 0, 16, 12], [0, 0, 5, 5]], np.float32),
        np.array([0.5, 0.4], np.float32),
        np.array([1, 1]),
        np.array([True, False]),
    )
    strict = image_metadata(rec, 2, None, CONCEPTS, preds, iou_threshold=0.8)
    loose = image_metadata(rec, 2, None, CONCEPTS, preds, iou_threshold=0.5)
    assert strict["token_kind"].tolist() == [2, 2]
    assert strict["tp"].tolist() == [0, 0] and loose["tp"].tolist() == [1, 0]  # query 1 was not kept
    assert loose["color"].tolist() == [0, -1] and strict["color"].tolist() == [
        -1,
        -1,
    ]  # matched object's concepts
    one = ImageRecord(1, "y.png", None, 64, 64, None, rec.annotations[1:])
    m = image_metadata(one, 5, 2, CONCEPTS)
    assert m["color"][0] == 1 and m["shape"][0] == 1  # CLS of a single-object image carries its concepts
