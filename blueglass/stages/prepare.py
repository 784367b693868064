"""``prepare``: generate the toy world as a COCO-format dataset (train/val/test/… splits), or validate a
dataset already on disk (``dataset.kind: coco``)."""

from __future__ import annotations

from pathlib import Path

from blueglass.config import Params
from blueglass.data import CocoDataset, generate_toyworld
from blueglass.runtime import progress, write_json
from blueglass.tracking import start_run


def _check_on_disk(params: Params, base: Path) -> dict:
    """A dataset on disk (``kind: coco``) is not generated: every split is loaded and validated."""
    from blueglass.stages.train_model import load_split

    summary = {}
    for name in params.dataset.splits:
        split = load_split(params, base, name)
        summary[name] = {
            "images": len(split),
            "objects": sum(len(r.annotations) for r in split.images),
            "categories": len(split.categories),
            "fingerprint": split.fingerprint,
        }
    write_json(base / "metrics" / "prepare.json", summary)
    return summary


def run(params: Params, base: Path) -> dict:
    if params.dataset.kind == "coco":
        return _check_on_disk(params, base)
    ds = params.dataset
    out = base / ds.path
    splits = {name: (s.images, s.min_objects, s.max_objects) for name, s in ds.splits.items()}
    with progress() as bar:

        def tick(name: str, n: int):
            task = bar.add_task(f"toy world {name}", total=n, info="")
            return lambda k: bar.advance(task, k)

        generate_toyworld(out, splits, seed=ds.seed, image_size=ds.image_size, progress=tick)
    summary = {}
    for name in splits:
        split = CocoDataset.load(out / name)
        summary[name] = {
            "images": len(split),
            "objects": sum(len(r.annotations) for r in split.images),
            "fingerprint": split.fingerprint,
        }
    with start_run(
        "prepare",
        run_name=f"prepare {ds.name}",
        experiment=params.tracking.experiment,
        wandb_cfg=params.tracking.wandb,
    ) as r:
        r.log_params({"dataset": ds.model_dump()})
        r.log_metrics({name: {"images": s["images"], "objects": s["objects"]} for name, s in summary.items()})
        for name, s in summary.items():
            r.log_input(f"{ds.name}-{name}", s["fingerprint"], out / name, context=name)
    write_json(base / "metrics" / "prepare.json", summary)
    return summary
