"""Recording a Lens: run a model over a dataset split with the Recorder on, align metadata, write shards.

Images are cut into blocks of ``block_images`` (the tar samples); with several processes (torchrun /
``torch.distributed`` initialised) rank r records blocks r, r+world, … into its own shards and rank 0
merges the ranks' parts into the manifest. Everything is written into ``.<name>.tmp/`` beside the target
and renamed into place at the end, so an interrupted extraction leaves no half-Lens behind and a rerun
starts clean. Memory stays flat: one block is held at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import blueglass
from blueglass.data import CocoDataset
from blueglass.evaluation.runner import bind_classes
from blueglass.features.align import KIND_NAMES, batch_metadata, declared_layout, meta_dtype, token_layout
from blueglass.features.lens import MANIFEST, LensWriter, merge_parts, write_manifest
from blueglass.features.recorder import Recorder, resolve_points
from blueglass.models.base import ModelAdapter, TokenLayout


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _batch_metadata(
    recs, t, grid, concepts, preds, iou_threshold, known: dict, layout: TokenLayout | None = None
) -> np.ndarray:
    """Metadata rows of a batch for a layout of ``t`` tokens per image.

    A patches-only layout is the CLS+patches layout without its first row, so it is derived from an
    already computed one instead of aligning every image again. Points with a declared ``layout``
    (the adapter's ``point_layout``) use it instead of inferring tokens from their count.
    """
    if layout is not None:
        return batch_metadata(recs, t, grid, concepts, preds, iou_threshold, layout=layout)
    richer = known.get((t + 1, None))
    if richer is not None and grid and t == grid * grid:
        rows = richer.reshape(len(recs), t + 1)[:, 1:].reshape(-1).copy()
        rows["token_id"] -= 1
        return rows
    return batch_metadata(recs, t, grid, concepts, preds, iou_threshold)


def lens_md5(root: Path) -> str:
    """The Lens fingerprint: md5 of its manifest (which holds every shard's sha256)."""
    return hashlib.md5((Path(root) / MANIFEST).read_bytes()).hexdigest()


def record_lens(
    adapter: ModelAdapter,
    ds: CocoDataset,
    specs: Sequence[str],
    out_dir: Path,
    *,
    batch_size: int = 64,
    block_images: int = 64,
    blocks_per_shard: int = 8,
    dtype: str = "float16",
    iou_threshold: float = 0.5,
    rank: int = 0,
    world: int = 1,
    manifest_extra: Mapping[str, Any] | None = None,
    tick: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """Record ``specs`` (points, globs, aliases) over every image of ``ds`` into ``out_dir``.

    Returns the manifest on rank 0 (``None`` on other ranks).
    """
    bind_classes(adapter, ds)  # label space / prompts of real models
    points = resolve_points(specs, adapter.hook_points(), getattr(adapter, "aliases", dict)())
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "parts").mkdir(parents=True)
    _barrier(world)

    grid = getattr(adapter, "grid", None)
    point_layout = getattr(adapter, "point_layout", None)  # declared per-point token layouts, if any
    concepts = ds.concepts
    n_blocks = math.ceil(len(ds) / block_images)
    writer: LensWriter | None = None
    layouts: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    forward_s = 0.0
    torch_dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.float32}[dtype]
    with Recorder(adapter.module, points, dtype=torch_dtype) as rec, torch.no_grad():
        for b in range(rank, n_blocks, world):
            records = ds.images[b * block_images : (b + 1) * block_images]
            block_acts: dict[str, list[np.ndarray]] = {p.name: [] for p in points}
            block_meta: dict[str, list[np.ndarray]] = {p.name: [] for p in points}
            for i in range(0, len(records), batch_size):
                recs = records[i : i + batch_size]
                sizes = [(r.height, r.width) for r in recs]
                t0 = time.perf_counter()
                outputs = adapter.forward(adapter.preprocess([ds.load_image(r) for r in recs]))
                forward_s += time.perf_counter() - t0
                acts = rec.take()
                preds = None
                if adapter.task == "detection" and hasattr(adapter, "token_predictions"):
                    dets = adapter.postprocess(outputs, sizes)
                    preds = adapter.token_predictions(outputs, dets, sizes)
                metas: dict = {}  # (tokens per image, layout) → this batch's metadata rows
                for p in points:
                    a = acts[p.name]  # [n, T, d]
                    t = a.shape[1]
                    lay = point_layout(p.module) if point_layout else None
                    if p.name not in layouts:
                        if lay is not None:
                            kinds, _, _ = declared_layout(t, lay)
                            pgrid = [lay.rows, lay.cols] if (kinds == 1).any() else None
                        else:
                            kinds, _, _ = token_layout(t, grid)
                            pgrid = grid if (kinds == 1).any() else None
                        layouts[p.name] = {
                            "tokens_per_image": t,
                            "grid": pgrid,
                            "kinds": {KIND_NAMES[int(k)]: int((kinds == k).sum()) for k in np.unique(kinds)},
                            "d": int(a.shape[2]),
                        }
                    block_acts[p.name].append(a.reshape(-1, a.shape[2]).numpy())
                    if (t, lay) not in metas:  # points with the same token layout share their metadata rows
                        metas[t, lay] = _batch_metadata(
                            recs, t, grid, concepts, preds, iou_threshold, metas, lay
                        )
                    block_meta[p.name].append(metas[t, lay])
                if tick:
                    tick(len(recs))
            if writer is None:
                writer = LensWriter(
                    tmp,
                    {p.name: layouts[p.name]["d"] for p in points},
                    rank=rank,
                    blocks_per_shard=blocks_per_shard,
                    dtype=dtype,
                )
            writer.add_block(
                b,
                {p: np.concatenate(v) for p, v in block_acts.items()},
                {p: np.concatenate(v) for p, v in block_meta.items()},
            )
    part = (
        writer.close()
        if writer is not None
        else {p.name: {"rows": 0, "images": 0, "sum": [0.0], "norm_sum": 0.0, "shards": []} for p in points}
    )
    part_info = {
        "part": part,
        "layouts": layouts,
        "seconds": time.perf_counter() - start,
        "forward_seconds": forward_s,
    }
    (tmp / "parts" / f"rank-{rank:03d}.json").write_text(json.dumps(part_info))
    _barrier(world)
    if rank != 0:
        _barrier(world)
        return None

    infos = [json.loads(f.read_text()) for f in sorted((tmp / "parts").glob("rank-*.json"))]
    control_seed = getattr(adapter, "control_seed", None)
    all_layouts: dict[str, Any] = {}
    for info in infos:
        all_layouts.update(info["layouts"])
    point_info = {
        p.name: {
            "module": p.module,
            "on_input": p.on_input,
            "d": all_layouts[p.name]["d"],
            "dtype": dtype,
            "layout": {k: v for k, v in all_layouts[p.name].items() if k != "d"},
            "depth": depth,  # position in the model's module order (the manifest's keys are sorted)
        }
        for depth, p in enumerate(points)
        if p.name in all_layouts
    }
    manifest = {
        "created_by": f"blueglass {blueglass.__version__}",
        "dataset": {
            "name": getattr(ds, "name", ds.root.parent.name),
            "split": getattr(ds, "split", ds.root.name),
            "fingerprint": ds.fingerprint,
            "images": len(ds),
        },
        "model": {
            "name": adapter.name,
            "adapter": type(adapter).__name__,
            "task": adapter.task,
            "weights_sha256": None if control_seed is not None else adapter.weights_sha256,
            "control": None
            if control_seed is None
            else {"seed": control_seed, "random_init_of": adapter.weights_sha256},
        },
        "block_images": block_images,
        "blocks_per_shard": blocks_per_shard,
        "ranks": world,
        "concepts": concepts,
        "categories": {str(k): v for k, v in ds.categories.items()},
        "meta_fields": list(meta_dtype(list(concepts)).names),
        "iou_threshold": iou_threshold,
        "points": merge_parts([i["part"] for i in infos], point_info),
        **(manifest_extra or {}),
    }
    shutil.rmtree(tmp / "parts")
    write_manifest(tmp, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    _barrier(world)
    manifest["timing"] = {
        "seconds": max(i["seconds"] for i in infos),
        "forward_seconds": sum(i["forward_seconds"] for i in infos),
    }
    return manifest
