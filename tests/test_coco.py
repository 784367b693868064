import json
import shutil

import pytest

from blueglass.data import CocoDataset
from blueglass.errors import DatasetError


@pytest.fixture
def split(tmp_path, toy_root):
    dst = tmp_path / "split"
    shutil.copytree(toy_root / "val", dst)
    return dst


def _edit(folder, fn):
    path = folder / "annotations.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_reads_a_coco_folder(split):
    ds = CocoDataset.load(split)
    assert len(ds) == 10
    rec = ds.images[0]
    assert rec.path.is_file() and rec.caption
    assert all(a.image_id == rec.id for a in rec.annotations)
    gt = ds.coco_dict()
    assert {"images", "annotations", "categories"} <= set(gt)
    assert len(ds.fingerprint) == 64


def test_reads_other_layouts(tmp_path, split):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    shutil.copytree(split / "images", tmp_path / "coco" / "val2017")
    shutil.copy(split / "annotations.json", tmp_path / "coco" / "annotations" / "instances_val2017.json")
    ds = CocoDataset.load(
        tmp_path / "coco", annotation_file="annotations/instances_val2017.json", image_dir="val2017"
    )
    assert len(ds) == 10 and ds.images[0].path.parent.name == "val2017"


def test_fingerprint_tracks_annotations(split):
    before = CocoDataset.load(split).fingerprint
    _edit(split, lambda d: d["annotations"][0].update(bbox=[1, 1, 5, 5]))
    assert CocoDataset.load(split).fingerprint != before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"][0].update(category_id=99), "unknown category id 99"),
        (lambda d: d["annotations"][0].update(bbox=[60, 60, 30, 30]), "outside its 64x64 image"),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 5]), "non-positive size"),
        (lambda d: d["annotations"][0].update(image_id=12345), "unknown image id 12345"),
        (lambda d: d.pop("categories"), "missing the COCO 'categories' list"),
    ],
)
def test_rejects_bad_annotations(split, edit, message):
    _edit(split, edit)
    with pytest.raises(DatasetError, match=message):
        CocoDataset.load(split)


def test_missing_files(tmp_path, split):
    (split / "images" / "000002.png").unlink()
    with pytest.raises(DatasetError, match="1 image file.*missing.*000002.png"):
        CocoDataset.load(split)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        CocoDataset.load(tmp_path / "nope")
    (split / "annotations.json").unlink()
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDataset.load(split)
