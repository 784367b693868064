"""The toy world: seeded RGB images of coloured shapes, written as a COCO-format dataset.

Every object has a shape (the detection category), a colour and a size drawn from small vocabularies, a
COCO box, and each image has a caption ("a small red circle and a large blue square", objects left to
right). Annotations carry the concept values under ``attributes``; the top-level ``concepts`` key lists
each concept's vocabulary. The same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 190, 70),
    "blue": (55, 95, 235),
    "yellow": (230, 205, 40),
}
# Box side as a fraction of the image side (min, max); 64 px images → small 12–15 px, large 20–25 px.
SIZES: dict[str, tuple[float, float]] = {"small": (0.19, 0.235), "large": (0.31, 0.39)}
CONCEPTS: dict[str, list[str]] = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ToyObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # x, y, w, h in pixels

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


def _split_rng(seed: int, split: str) -> np.random.Generator:
    # crc32 is stable across processes (unlike hash()), so each split has its own reproducible stream.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode())]))


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]], margin: int) -> bool:
    x, y, w, h = box
    for ox, oy, ow, oh in others:
        if x < ox + ow + margin and ox < x + w + margin and y < oy + oh + margin and oy < y + h + margin:
            return True
    return False


def sample_scene(rng: np.random.Generator, image_size: int, n_objects: int) -> list[ToyObject]:
    """Draw up to ``n_objects`` non-overlapping objects (fewer if the image is full)."""
    objects: list[ToyObject] = []
    boxes: list[tuple[int, int, int, int]] = []
    margin = max(1, image_size // 32)
    for _ in range(n_objects):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        lo, hi = SIZES[size]
        for _attempt in range(60):
            side = int(round(rng.uniform(lo, hi) * image_size))
            x = int(rng.integers(1, image_size - side - 1))
            y = int(rng.integers(1, image_size - side - 1))
            box = (x, y, side, side)
            if not _overlaps(box, boxes, margin):
                boxes.append(box)
                objects.append(ToyObject(shape, color, size, box))
                break
    return objects


def render_scene(rng: np.random.Generator, image_size: int, objects: list[ToyObject]) -> np.ndarray:
    """Render objects on a noisy grey background; returns ``[H, W, 3]`` uint8."""
    level = int(rng.integers(25, 80))
    img = Image.new("RGB", (image_size, image_size), (level, level, level))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        x, y, w, h = obj.box
        jitter = rng.integers(-18, 19, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter, strict=True))
        x1, y1 = x + w - 1, y + h - 1
        if obj.shape == "circle":
            draw.ellipse((x, y, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x, y, x1, y1), fill=fill)
        else:  # triangle, apex up
            draw.polygon([(x, y1), (x1, y1), ((x + x1) / 2, y)], fill=fill)
    pixels = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0.0, 6.0, size=pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def caption(objects: list[ToyObject]) -> str:
    parts = [f"a {o.describe()}" for o in sorted(objects, key=lambda o: (o.box[0], o.box[1]))]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def generate_split(
    out_dir: Path,
    split: str,
    n_images: int,
    *,
    seed: int,
    image_size: int = 64,
    min_objects: int = 1,
    max_objects: int = 4,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``out_dir/<split>/{images/, annotations.json}``; returns the split folder.

    The folder is assembled under a temporary name and renamed when complete, so an interrupted run
    leaves no half-written split behind.
    """
    rng = _split_rng(seed, split)
    final = Path(out_dir) / split
    tmp = Path(out_dir) / f".{split}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        n_obj = int(rng.integers(min_objects, max_objects + 1))
        objects = sample_scene(rng, image_size, n_obj)
        pixels = render_scene(rng, image_size, objects)
        file_name = f"{image_id:06d}.png"
        (tmp / "images" / file_name).write_bytes(_png_bytes(pixels))
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": image_size,
                "height": image_size,
                "caption": caption(objects),
            }
        )
        for obj in objects:
            x, y, w, h = obj.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[obj.shape],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "attributes": {"shape": obj.shape, "color": obj.color, "size": obj.size},
                }
            )
        if progress is not None:
            progress(1)
    doc = {
        "info": {
            "description": "BlueGlass toy world",
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "split": split,
            "image_size": image_size,
        },
        "licenses": [],
        "categories": categories,
        "concepts": CONCEPTS,
        "images": images,
        "annotations": annotations,
    }
    (tmp / "annotations.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def generate_toyworld(
    out_dir: Path,
    splits: dict[str, tuple[int, int, int]],
    *,
    seed: int,
    image_size: int = 64,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> Path:
    """Generate every split; ``splits`` maps name → (images, min_objects, max_objects)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (n, lo, hi) in splits.items():
        tick = progress(name, n) if progress else None
        generate_split(
            out_dir, name, n, seed=seed, image_size=image_size, min_objects=lo, max_objects=hi, progress=tick
        )
    return out_dir
