"""``extract@<lens>``: record a Lens dataset (activations + per-token metadata) into ``lens/<lens>/``.

Runs data-parallel when started by torchrun (``RANK``/``WORLD_SIZE`` set): each rank records its own
blocks of images into its own shards, rank 0 writes the merged manifest and the MLflow run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from blueglass.config import Params
from blueglass.errors import ConfigError
from blueglass.runtime import progress, setup, write_json
from blueglass.stages.train_model import load_split
from blueglass.tracking import start_run


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def run(params: Params, base: Path, name: str) -> dict[str, Any] | None:
    if params.extract is None or name not in params.extract.lenses:
        known = ", ".join(params.extract.lenses) if params.extract else "none"
        raise ConfigError(f"extract.lenses.{name}: no such Lens (lenses: {known})")
    ep = params.extract
    spec = ep.lenses[name]
    from blueglass.models import model_location, open_model

    folder = model_location(params, base, spec.model)
    ds = load_split(params, base, spec.split)
    rt = setup(params.runtime)
    rank, world = _distributed()

    from blueglass.features.extract import lens_md5, record_lens

    adapter = open_model(params, base, spec.model, device=rt["device"])
    if spec.control:
        adapter.reinitialize(spec.control_seed)
    out = base / "lens" / name
    n_blocks = -(-len(ds) // ep.block_images)
    per_rank = sum(min(ep.block_images, len(ds) - b * ep.block_images) for b in range(rank, n_blocks, world))
    with progress() as bar:
        task = bar.add_task(
            f"extract {name}" + (f" [rank {rank}]" if world > 1 else ""),
            total=per_rank,
            info="",
        )
        manifest = record_lens(
            adapter,
            ds,
            spec.points,
            out,
            batch_size=ep.batch_size,
            block_images=ep.block_images,
            blocks_per_shard=ep.blocks_per_shard,
            dtype=ep.dtype,
            iou_threshold=ep.iou_threshold,
            rank=rank,
            world=world,
            manifest_extra={
                "name": name,
                "params": {"lens": spec.model_dump(), "extract": ep.model_dump(exclude={"lenses"})},
            },
            tick=lambda k: bar.advance(task, k),
        )
    if manifest is None:
        return None
    md5 = lens_md5(out)
    rows = sum(p["rows"] for p in manifest["points"].values())
    nbytes = sum(p["bytes"] for p in manifest["points"].values())
    secs = manifest["timing"]["seconds"]
    summary = {
        "lens": name,
        "md5": md5,
        "points": len(manifest["points"]),
        "images": len(ds),
        "rows": rows,
        "bytes": nbytes,
        "seconds": secs,
        "images_per_s": len(ds) / max(secs, 1e-9),
        "rows_per_s": rows / max(secs, 1e-9),
        "ranks": world,
    }
    with start_run(
        "extract",
        run_name=f"extract {name}",
        experiment=params.tracking.experiment,
        wandb_cfg=params.tracking.wandb,
        tags={"lens": name, "model": spec.model, "split": spec.split},
    ) as r:
        r.log_params({"lens": spec.model_dump(), "extract": ep.model_dump(exclude={"lenses"}), "runtime": rt})
        r.log_input(f"{params.dataset.name}-{spec.split}", ds.fingerprint, ds.root, context="eval")
        r.log_input(spec.model, adapter.weights_sha256, folder, context="model")
        r.log_input(f"lens-{name}", md5, out, context="lens")
        r.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        r.log_artifact(out / "manifest.json")
    write_json(
        base / "metrics" / f"extract_{name}.json",
        {k: v for k, v in summary.items() if k != "seconds" and "per_s" not in k},
    )
    return summary
