"""Latent attribution: what does an SAE latent respond to?

* :func:`top_activations` — for every latent, the top-N activating tokens across a Lens point, by a
  streaming top-k over blocks (the running ``[N, d_sae]`` best values merged with each block's codes), so
  nothing of size tokens × latents is ever held;
* :func:`class_means` — mean activation per class × latent (streamed sums);
* :func:`render_latents` — image crops of a latent's top tokens with the token's patch (or its detection
  box) drawn, a class × latent heatmap, and ``latents.json`` describing them, for the report and MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blueglass.features.align import CLS, PATCH
from blueglass.features.lens import Lens
from blueglass.interp.sae import SparseAutoencoder


@torch.no_grad()
def top_activations(
    sae: SparseAutoencoder, lens: Lens, point: str, n: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values [n, d_sae], rows [n, d_sae], meta)`` — per latent, its ``n`` largest activations (descending)
    and their global row index in the point (Lens order); ``meta`` holds the metadata of every row that
    appears. Rows that never fire keep value 0 and row −1."""
    d = sae.cfg.d_sae
    best_v = torch.zeros(n, d)
    best_r = torch.full((n, d), -1, dtype=torch.long)
    offset = 0
    for block in lens.blocks(point):
        codes = sae.encode(torch.from_numpy(block.feats).float())  # [rows, d_sae], one block at a time
        rows = torch.arange(offset, offset + len(codes))[:, None].expand(-1, d)
        v = torch.cat([best_v, codes])
        r = torch.cat([best_r, rows])
        best_v, idx = v.topk(n, dim=0)  # ties: torch keeps the earlier (lower) index first
        best_r = r.gather(0, idx)
        offset += len(codes)
    best_r[best_v <= 0] = -1
    wanted = np.unique(best_r.numpy()[best_r.numpy() >= 0])
    metas, offset = [], 0
    for block in lens.blocks(point):
        local = wanted[(wanted >= offset) & (wanted < offset + len(block.meta))] - offset
        if len(local):
            m = block.meta[local]
            metas.append((local + offset, m))
        offset += len(block.meta)
    meta = None
    if metas:
        meta = np.concatenate([m for _, m in metas])
        order = np.concatenate([r for r, _ in metas])
        meta = {"row": order, "meta": meta}
    return best_v.numpy(), best_r.numpy(), meta


@torch.no_grad()
def class_means(sae: SparseAutoencoder, lens: Lens, point: str, column: str, n_classes: int) -> np.ndarray:
    """Mean activation ``[n_classes, d_sae]`` of each latent over the tokens of each class of ``column``."""
    sums = torch.zeros(n_classes, sae.cfg.d_sae, dtype=torch.float64)
    counts = torch.zeros(n_classes, dtype=torch.float64)
    for block in lens.blocks(point):
        labels = torch.from_numpy(block.meta[column].astype(np.int64))
        keep = (labels >= 0) & (labels < n_classes)
        if not keep.any():
            continue
        codes = sae.encode(torch.from_numpy(block.feats[keep.numpy()]).float()).double()
        sums.index_add_(0, labels[keep], codes)
        counts += torch.bincount(labels[keep], minlength=n_classes).double()
    return (sums / counts.clamp_min(1)[:, None]).float().numpy()


def token_box(m: np.void, grid: int | None, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The image region of a token: its patch, its detection box (queries / kept detections), or the image."""
    h, w = size
    if int(m["token_kind"]) == PATCH and grid and int(m["row"]) >= 0:
        ph, pw = h / grid, w / grid
        return (m["col"] * pw, m["row"] * ph, (m["col"] + 1) * pw, (m["row"] + 1) * ph)
    if int(m["token_kind"]) != CLS and "pred_box" in m.dtype.names and float(np.abs(m["pred_box"]).sum()) > 0:
        x0, y0, x1, y1 = (float(v) for v in m["pred_box"])
        return (x0, y0, x1, y1)
    return (0.0, 0.0, float(w), float(h))


def render_latents(
    sae: SparseAutoencoder,
    lens: Lens,
    point: str,
    images: Mapping[int, Path],
    out_dir: Path,
    *,
    recovery: Mapping[str, Any] | None = None,
    class_column: str = "cover_class",
    classes: Mapping[int, str] | None = None,
    n_latents: int = 8,
    n_tokens: int = 12,
    crop: int = 72,
) -> dict[str, Any]:
    """Write ``latent_<j>.png`` grids for the top latents, ``class_heatmap.png`` and ``latents.json``.

    Top latents: those that best separate a concept value (``recovery`` from
    :func:`~blueglass.interp.concepts.best_latent_auroc`), then the most strongly activating ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    values, rows, meta = top_activations(sae, lens, point, n_tokens)
    labels: dict[int, tuple[str, float]] = {}
    for concept, rec in (recovery or {}).items():
        for value, r in rec.get("values", {}).items():
            for j, auc in r.get("top", [[r["latent"], r["auroc"]]]):
                if auc > labels.get(j, ("", 0.0))[1]:
                    labels[j] = (f"{concept}={value}", auc)
    ranked = sorted(labels, key=lambda j: -labels[j][1])
    strongest = [int(j) for j in np.argsort(-values[0], kind="stable") if values[0, j] > 0]
    chosen: list[int] = []
    for j in ranked + strongest:
        if j not in chosen and values[0, j] > 0:
            chosen.append(int(j))
        if len(chosen) == n_latents:
            break
    grid = lens.point(point).get("layout", {}).get("grid")
    grid = grid[0] if isinstance(grid, list) else grid
    row_meta = dict(zip(meta["row"].tolist(), meta["meta"], strict=True)) if meta else {}
    entries = []
    for j in chosen:
        tiles = []
        for r in rows[:, j]:
            if r < 0:
                continue
            m = row_meta[int(r)]
            img = Image.open(images[int(m["image_id"])]).convert("RGB")
            x0, y0, x1, y1 = token_box(m, grid, (img.height, img.width))
            cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0, img.width / 4)
            box = (cx - half, cy - half, cx + half, cy + half)
            tile = img.crop(tuple(int(round(b)) for b in box)).resize((crop, crop), Image.NEAREST)
            s = crop / (2 * half)
            ImageDraw.Draw(tile).rectangle(
                [(x0 - box[0]) * s, (y0 - box[1]) * s, (x1 - box[0]) * s - 1, (y1 - box[1]) * s - 1],
                outline=(255, 40, 40),
                width=2,
            )
            tiles.append(tile)
        sheet = Image.new("RGB", (crop * len(tiles) + 2 * (len(tiles) - 1), crop), (255, 255, 255))
        for i, t in enumerate(tiles):
            sheet.paste(t, (i * (crop + 2), 0))
        name = f"latent_{j}.png"
        sheet.save(out_dir / name)
        concept, auc = labels.get(j, (None, None))
        entries.append(
            {
                "latent": j,
                "max_activation": float(values[0, j]),
                "concept": concept,
                "concept_auroc": auc,
                "tokens": len(tiles),
                "grid": name,
            }
        )
    doc: dict[str, Any] = {"point": point, "top_latents": entries}
    if classes and class_column in lens.manifest.get("meta_fields", []):
        ids = sorted(classes)
        class_names = [classes[i] for i in ids]
        means = class_means(sae, lens, point, class_column, max(ids) + 1)[ids]
        sub = means[:, chosen] if chosen else means[:, :0]
        fig, ax = plt.subplots(figsize=(1 + 0.6 * max(1, len(chosen)), 0.8 + 0.45 * len(class_names)))
        im = ax.imshow(sub, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(chosen)), [str(j) for j in chosen])
        ax.set_yticks(range(len(class_names)), list(class_names))
        ax.set_xlabel("latent")
        ax.set_title(f"mean activation by {class_column}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "class_heatmap.png", dpi=100)
        plt.close(fig)
        doc["class_heatmap"] = "class_heatmap.png"
        doc["class_means"] = {"column": class_column, "classes": list(class_names), "latents": chosen}
    (out_dir / "latents.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc
