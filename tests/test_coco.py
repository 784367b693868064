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


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "malformed bbox"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
        (lambda d: d["images"][0].pop("width"), "image entry lacks 'width'"),
        (lambda d: d["categories"][0].pop("name"), "a category lacks 'id' or 'name'"),
    ],
)
def test_rejects_more_bad_annotations(split, edit, message):
    _edit(split, edit)
    with pytest.raises(DatasetError, match=message):
        CocoDataset.load(split)


def test_not_json(split):
    (split / "annotations.json").write_text("{nope")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDataset.load(split)


def test_category_subset_and_mini_split(split):
    full = CocoDataset.load(split)
    sub = CocoDataset.load(split, categories=["circle"])
    assert sub.category_names == ["circle"] and len(sub) == len(full)
    assert all(a.category_id == 1 for r in sub.images for a in r.annotations)
    assert sub.fingerprint != full.fingerprint
    with pytest.raises(DatasetError, match=r"unknown category \['hexagon'\].*circle, square, triangle"):
        CocoDataset.load(split, categories=["hexagon"])
    mini = CocoDataset.load(split, mini=4, seed=1)
    again = CocoDataset.load(split, mini=4, seed=1)
    other = CocoDataset.load(split, mini=4, seed=2)
    assert len(mini) == 4 and [r.id for r in mini.images] == [r.id for r in again.images]
    assert [r.id for r in mini.images] != [r.id for r in other.images]
    ids = {r.id for r in mini.images}
    assert {a["image_id"] for a in mini.coco_dict()["annotations"]} <= ids
    assert mini.fingerprint == again.fingerprint != other.fingerprint


def test_image_folder(tmp_path, split):
    full = CocoDataset.load(split)
    root = tmp_path / "imagefolder"
    for r in full.images:
        cls = full.categories[r.annotations[0].category_id]
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(r.path, root / cls / r.file_name)
    (root / "circle" / "notes.txt").write_text("not an image")
    ds = CocoDataset.from_image_folder(root)
    assert len(ds) == 10 and set(ds.category_names) <= {"circle", "square", "triangle"}
    rec = ds.images[0]
    assert len(rec.annotations) == 1 and rec.annotations[0].bbox == (0, 0, rec.width, rec.height)
    assert ds.load_image(rec).shape == (64, 64, 3) and len(ds.fingerprint) == 64
    assert len(CocoDataset.from_image_folder(root, mini=3)) == 3
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoDataset.from_image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        CocoDataset.from_image_folder(tmp_path / "flat")
    (root / "circle" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png: not a readable image"):
        CocoDataset.from_image_folder(root)
