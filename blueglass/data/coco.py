"""Reader for COCO-format detection datasets (the toy world and real datasets alike).

A dataset is a folder of images plus a COCO ``instances`` JSON. Loading validates what later stages rely
on — every image file exists, every box lies inside its image with positive size, every annotation names
a known image and category — and fails with one clear line otherwise. A load may keep a subset of the
categories (by name) and draw a ``mini`` split (a seeded random sample of images); both are part of the
fingerprint. An image-classification tree (``<root>/<class>/<image>``, torchvision's ImageFolder layout)
loads as the same kind of dataset: one whole-image object per image (:meth:`CocoDataset.from_image_folder`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from blueglass.errors import DatasetError

_BOX_TOLERANCE = 1.0  # pixels a box may overhang the image edge (rounding in real annotations)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h
    area: float
    iscrowd: int = 0
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.bbox
        return (x, y, x + w, y + h)


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    path: Path
    width: int
    height: int
    caption: str | None
    annotations: tuple[Annotation, ...]


class CocoDataset:
    """An in-memory index over a COCO-format folder.

    ``CocoDataset.load(folder)`` expects ``folder/annotations.json`` and ``folder/images/`` (the layout the
    toy world writes); pass ``annotation_file`` and ``image_dir`` for other layouts such as
    ``annotations/instances_val2017.json`` + ``val2017/``.
    """

    def __init__(
        self,
        root: Path,
        annotation_file: Path | None,
        image_dir: Path,
        doc: dict[str, Any],
        selection: str = "",
    ):
        self.root = root
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self._doc = doc
        self.selection = selection  # how this view was drawn from the files (subset / mini); fingerprinted
        self.name = root.parent.name  # dataset and split names (recipes set them from params)
        self.split = root.name
        self.categories: dict[int, str] = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        self.concepts: dict[str, list[str]] = {k: list(v) for k, v in doc.get("concepts", {}).items()}
        by_image: dict[int, list[Annotation]] = {}
        for a in doc.get("annotations", []):
            ann = Annotation(
                id=int(a["id"]),
                image_id=int(a["image_id"]),
                category_id=int(a["category_id"]),
                bbox=tuple(float(v) for v in a["bbox"]),  # type: ignore[arg-type]
                area=float(a.get("area", a["bbox"][2] * a["bbox"][3])),
                iscrowd=int(a.get("iscrowd", 0)),
                attributes=dict(a.get("attributes", {})),
            )
            by_image.setdefault(ann.image_id, []).append(ann)
        self.images: list[ImageRecord] = [
            ImageRecord(
                id=int(im["id"]),
                file_name=str(im["file_name"]),
                path=image_dir / str(im["file_name"]),
                width=int(im["width"]),
                height=int(im["height"]),
                caption=im.get("caption"),
                annotations=tuple(by_image.get(int(im["id"]), [])),
            )
            for im in doc["images"]
        ]

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        annotation_file: str | Path = "annotations.json",
        image_dir: str | Path = "images",
        check_files: bool = True,
        categories: list[str] | None = None,
        mini: int | None = None,
        seed: int = 0,
    ) -> CocoDataset:
        """Load and validate; optionally keep only ``categories`` (names) and a seeded ``mini`` sample."""
        root = Path(folder)
        ann_path = root / annotation_file
        img_dir = root / image_dir
        if not root.is_dir():
            raise DatasetError(f"{root}: dataset folder not found")
        if not ann_path.is_file():
            raise DatasetError(f"{ann_path}: annotation file not found")
        try:
            doc = json.loads(ann_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{ann_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        for key in ("images", "categories"):
            if not isinstance(doc.get(key), list):
                raise DatasetError(f"{ann_path}: missing the COCO '{key}' list")
        cls._validate(doc, ann_path)
        doc, selection = cls._select(doc, ann_path, categories, mini, seed)
        ds = cls(root, ann_path, img_dir, doc, selection)
        if check_files:
            missing = [im.file_name for im in ds.images if not im.path.is_file()]
            if missing:
                raise DatasetError(
                    f"{img_dir}: {len(missing)} image file(s) listed in {ann_path.name} are missing "
                    f"(first: {missing[0]})"
                )
        return ds

    @staticmethod
    def _select(
        doc: dict[str, Any], where: Path, categories: list[str] | None, mini: int | None, seed: int
    ) -> tuple[dict[str, Any], str]:
        """The category subset and the ``mini`` image sample of a validated document."""
        parts = []
        if categories is not None:
            names = {str(c["name"]): int(c["id"]) for c in doc["categories"]}
            unknown = [c for c in categories if c not in names]
            if unknown:
                raise DatasetError(
                    f"{where}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} "
                    f"(the file has: {', '.join(sorted(names)[:20])}{' …' if len(names) > 20 else ''})"
                )
            keep = {names[c] for c in categories}
            doc = {
                **doc,
                "categories": [c for c in doc["categories"] if int(c["id"]) in keep],
                "annotations": [a for a in doc.get("annotations", []) if int(a["category_id"]) in keep],
            }
            parts.append("categories=" + ",".join(sorted(categories)))
        if mini is not None and mini < len(doc["images"]):
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(len(doc["images"]), size=mini, replace=False))
            images = [doc["images"][i] for i in pick]
            ids = {int(im["id"]) for im in images}
            doc = {
                **doc,
                "images": images,
                "annotations": [a for a in doc.get("annotations", []) if int(a["image_id"]) in ids],
            }
            parts.append(f"mini={mini},seed={seed}")
        return doc, ";".join(parts)

    @classmethod
    def from_image_folder(
        cls,
        folder: str | Path,
        *,
        mini: int | None = None,
        seed: int = 0,
        categories: list[str] | None = None,
    ) -> CocoDataset:
        """An ImageFolder tree (``<folder>/<class>/<image>``): classes are the sorted subfolder names
        (ids 1…K); every image is one object of its class covering the whole image."""
        root = Path(folder)
        if not root.is_dir():
            raise DatasetError(f"{root}: image folder not found")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DatasetError(f"{root}: no class subfolders (expected <root>/<class>/<image>)")
        doc: dict[str, Any] = {
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
            "images": [],
            "annotations": [],
        }
        for ci, c in enumerate(classes):
            for f in sorted((root / c).iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(f) as im:
                        w, h = im.size
                except OSError:
                    raise DatasetError(f"{f}: not a readable image") from None
                iid = len(doc["images"]) + 1
                doc["images"].append({"id": iid, "file_name": f"{c}/{f.name}", "width": w, "height": h})
                doc["annotations"].append(
                    {"id": iid, "image_id": iid, "category_id": ci + 1, "bbox": [0, 0, w, h], "area": w * h}
                )
        if not doc["images"]:
            raise DatasetError(f"{root}: no images in the class subfolders ({', '.join(IMAGE_SUFFIXES)})")
        doc, selection = cls._select(doc, root, categories, mini, seed)
        return cls(root, None, root, doc, selection or "imagefolder")

    @staticmethod
    def _validate(doc: dict[str, Any], where: Path) -> None:
        cat_ids = set()
        for c in doc["categories"]:
            if "id" not in c or "name" not in c:
                raise DatasetError(f"{where}: a category lacks 'id' or 'name'")
            cat_ids.add(int(c["id"]))
        sizes: dict[int, tuple[int, int]] = {}
        for im in doc["images"]:
            for key in ("id", "file_name", "width", "height"):
                if key not in im:
                    raise DatasetError(f"{where}: image entry lacks '{key}': {json.dumps(im)[:80]}")
            if int(im["id"]) in sizes:
                raise DatasetError(f"{where}: duplicate image id {im['id']}")
            sizes[int(im["id"])] = (int(im["width"]), int(im["height"]))
        seen = set()
        for a in doc.get("annotations", []):
            aid = a.get("id")
            if aid in seen:
                raise DatasetError(f"{where}: duplicate annotation id {aid}")
            seen.add(aid)
            if int(a.get("category_id", -1)) not in cat_ids:
                raise DatasetError(
                    f"{where}: annotation {aid} has unknown category id {a.get('category_id')}"
                )
            if int(a.get("image_id", -1)) not in sizes:
                raise DatasetError(
                    f"{where}: annotation {aid} refers to unknown image id {a.get('image_id')}"
                )
            box = a.get("bbox")
            if not (isinstance(box, list) and len(box) == 4):
                raise DatasetError(f"{where}: annotation {aid} has a malformed bbox {box!r}")
            x, y, w, h = (float(v) for v in box)
            iw, ih = sizes[int(a["image_id"])]
            t = _BOX_TOLERANCE
            if w <= 0 or h <= 0 or x < -t or y < -t or x + w > iw + t or y + h > ih + t:
                raise DatasetError(
                    f"{where}: annotation {aid} has bbox {box} outside its {iw}x{ih} image or of non-positive size"
                )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.images)

    @property
    def category_names(self) -> list[str]:
        """Category names ordered by category id."""
        return [self.categories[k] for k in sorted(self.categories)]

    def load_image(self, record: ImageRecord) -> np.ndarray:
        """The image as ``[H, W, 3]`` uint8 RGB."""
        with Image.open(record.path) as im:
            return np.array(im.convert("RGB"))

    def coco_dict(self) -> dict[str, Any]:
        """The ground truth as a COCO dict (for the evaluator)."""
        return self._doc

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the annotation file and the (name, size) of every image file.

        Reading every image byte would make fingerprinting a real dataset slow; a changed image nearly
        always changes its size, and any relabelling changes the annotation file.
        """
        if self.annotation_file is not None:
            h = hashlib.sha256(self.annotation_file.read_bytes())
        else:  # an ImageFolder: the class list stands in for the annotation file
            h = hashlib.sha256(json.dumps(self._doc["categories"], sort_keys=True).encode())
        if self.selection:
            h.update(f"selection\0{self.selection}\n".encode())
        for im in sorted(self.images, key=lambda r: r.file_name):
            size = im.path.stat().st_size if im.path.exists() else -1
            h.update(f"{im.file_name}\0{size}\n".encode())
        return h.hexdigest()
