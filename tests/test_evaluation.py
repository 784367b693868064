import numpy as np
import pytest
import torch

from blueglass.data import CocoDataset
from blueglass.errors import ConfigError
from blueglass.evaluation import evaluate_detections, prompt_families, zero_shot_accuracy
from blueglass.evaluation.classification import image_values
from blueglass.models.base import Detections

GT = {
    "images": [
        {"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
        {"id": 2, "width": 100, "height": 100, "file_name": "b.png"},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 60, 25, 25], "area": 625, "iscrowd": 0},
    ],
}


def _preds(shift=0.0, labels=None):
    boxes = {1: [[10, 10, 30, 30], [50, 50, 80, 80]], 2: [[5, 60, 30, 85]]}
    labs = labels or {1: [1, 2], 2: [1]}
    out = {}
    for img, bx in boxes.items():
        b = np.array(bx, np.float32) + np.array([shift, 0, shift, 0], np.float32)
        out[img] = Detections(b, np.full(len(b), 0.9, np.float32), np.array(labs[img]), np.arange(len(b)))
    return out


def test_perfect_predictions_score_one():
    m = evaluate_detections(GT, _preds())
    for key in ("AP", "AP50", "AP75", "APs", "AR100"):
        assert m[key] == pytest.approx(1.0)
    assert m["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert m["APl"] is None  # no large object: COCO's -1 becomes None


def test_shifted_boxes_score_lower():
    # a 6 px shift keeps IoU > 0.5 (AP50 stays 1) but fails the stricter thresholds
    m = evaluate_detections(GT, _preds(shift=6))
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] < 1.0 and m["AP"] < 0.8
    far = evaluate_detections(GT, _preds(shift=40))
    assert far["AP50"] == pytest.approx(0.0) and far["AP"] == pytest.approx(0.0)


def test_wrong_class_and_missing_predictions():
    m = evaluate_detections(GT, _preds(labels={1: [2, 1], 2: [2]}))
    assert m["AP"] == pytest.approx(0.0)
    empty = evaluate_detections(GT, {})
    assert empty["AP50"] == 0.0 and set(empty["per_class"]) == {"cat", "dog"}
    half = evaluate_detections(GT, {1: _preds()[1]})  # image 2's cat is never found
    assert half["per_class"]["dog"] == pytest.approx(1.0)
    assert half["per_class"]["cat"] == pytest.approx(0.5, abs=0.02)


def test_zero_shot_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert zero_shot_accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_prompt_families(toy_root):
    ds = CocoDataset.load(toy_root / "test_single")
    fams = {f.name: f for f in prompt_families(ds, {"c": "a {color} thing", "cs": "a {color} {category}"})}
    assert fams["c"].prompts == [f"a {c} thing" for c in ds.concepts["color"]]
    assert len(fams["cs"].classes) == len(ds.concepts["color"]) * len(ds.category_names)
    rec = ds.images[0]
    values = image_values(ds, rec)
    assert fams["c"].prompts[fams["c"].label(values)] == f"a {values['color']} thing"
    with pytest.raises(ConfigError, match="benchmark.prompts.bad"):
        prompt_families(ds, {"bad": "a {texture} thing"})
