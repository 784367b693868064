import hashlib
import json

from blueglass.data import COLORS, SHAPES, SIZES, CocoDataset, generate_split


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_bytes(tmp_path):
    a = generate_split(tmp_path / "a", "train", 12, seed=7)
    b = generate_split(tmp_path / "b", "train", 12, seed=7)
    c = generate_split(tmp_path / "c", "train", 12, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_splits_draw_different_images(tmp_path):
    a = generate_split(tmp_path, "train", 5, seed=0)
    b = generate_split(tmp_path, "val", 5, seed=0)
    assert (a / "images" / "000001.png").read_bytes() != (b / "images" / "000001.png").read_bytes()


def test_scene_contents(tmp_path):
    folder = generate_split(tmp_path, "test", 60, seed=1, min_objects=1, max_objects=4)
    ds = CocoDataset.load(folder)
    assert len(ds) == 60
    counts = [len(r.annotations) for r in ds.images]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    assert ds.category_names == list(SHAPES)
    assert set(ds.concepts) == {"shape", "color", "size"}
    for rec in ds.images:
        img = ds.load_image(rec)
        assert img.shape == (64, 64, 3) and img.dtype.name == "uint8"
        boxes = [a.xyxy for a in rec.annotations]
        for i, a in enumerate(rec.annotations):
            x0, y0, x1, y1 = a.xyxy
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert a.attributes["color"] in COLORS and a.attributes["size"] in SIZES
            assert ds.categories[a.category_id] == a.attributes["shape"]
            assert f"{a.attributes['size']} {a.attributes['color']} {a.attributes['shape']}" in rec.caption
            for j, (u0, v0, u1, v1) in enumerate(boxes):  # objects never overlap
                if j != i:
                    assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0
        # the object really is drawn in its colour: the box centre is far from the grey background
        a = rec.annotations[0]
        cx, cy = int(a.bbox[0] + a.bbox[2] / 2), int(a.bbox[1] + a.bbox[3] / 2)
        r, g, b = (int(v) for v in img[cy, cx])
        assert max(r, g, b) - min(r, g, b) > 60


def test_no_temporary_folder_left(tmp_path):
    generate_split(tmp_path, "train", 3, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    doc = json.loads((tmp_path / "train" / "annotations.json").read_text())
    assert doc["info"]["seed"] == 0 and len(doc["images"]) == 3
