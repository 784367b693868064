"""``train_model``: train one embedded model, evaluate it on ``val``, save it, register it in MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from blueglass.config import TRAINABLE_KINDS, DetectorModelParams, Params, VlmModelParams
from blueglass.data import CocoDataset
from blueglass.errors import ConfigError, DatasetError
from blueglass.evaluation.runner import HEADLINE, evaluate, headline_metrics
from blueglass.runtime import progress, replace_dir, setup, write_json
from blueglass.tracking import register_model, start_run


def load_split(params: Params, base: Path, split: str) -> CocoDataset:
    """A split of the params' dataset: the generated toy world, or a COCO / ImageFolder split on disk."""
    ds_params = params.dataset
    if ds_params.kind == "coco":
        if split not in ds_params.splits:
            raise ConfigError(
                f"dataset.splits.{split}: no such split (splits: {', '.join(ds_params.splits)})"
            )
        spec = ds_params.splits[split]
        images = base / spec.images
        select = {"categories": spec.categories, "mini": spec.mini, "seed": spec.seed}
        if spec.layout == "imagefolder":
            ds = CocoDataset.from_image_folder(images, **select)
        else:
            ds = CocoDataset.load(images, annotation_file=base / spec.annotations, image_dir=".", **select)
        ds.name, ds.split = ds_params.name, split
        return ds
    folder = base / ds_params.path / split
    if not folder.exists():
        raise DatasetError(f"{folder}: split not found (run `blueglass prepare` first)")
    return CocoDataset.load(folder)


def run(params: Params, base: Path, name: str) -> dict[str, Any]:
    if name not in params.models:
        raise ConfigError(f"models.{name}: no such model (models: {', '.join(params.models)})")
    mp = params.models[name]
    if mp.kind not in TRAINABLE_KINDS:
        raise ConfigError(
            f"models.{name}: kind {mp.kind!r} is a model on disk, not trained by BlueGlass "
            "(benchmark and extract use its weights directly)"
        )
    train_ds = load_split(params, base, "train")
    val_ds = load_split(params, base, "val")
    rt = setup(params.runtime)

    import torch

    from blueglass.models import load_adapter
    from blueglass.training.common import load_split_arrays

    final = base / "models" / name
    tmp = final.with_name(f".{name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    data = load_split_arrays(train_ds)
    with progress() as bar:
        task = bar.add_task(f"train {name}", total=mp.train.steps, info="")

        def report(step: int, h: dict[str, float]) -> None:
            bar.update(task, completed=step, info=f"loss {h['loss']:.3f}")

        if isinstance(mp, DetectorModelParams):
            from blueglass.models.detector import save_detector
            from blueglass.training.detector import train_detector

            model, history = train_detector(mp, data, progress=report)
            save_detector(
                model,
                tmp,
                train_ds.category_names,
                {
                    "name": name,
                    "category_ids": sorted(train_ds.categories),
                    "score_threshold": mp.score_threshold,
                    "nms_iou": mp.nms_iou,
                    "max_detections": mp.max_detections,
                },
            )
        elif isinstance(mp, VlmModelParams):
            from blueglass.training.vlm import save_vlm, train_vlm

            model, tokenizer, history = train_vlm(
                mp, data, train_ds.concepts, train_ds.category_names, progress=report
            )
            model.config.blueglass_name = name
            save_vlm(model, tokenizer, tmp)
        else:  # pragma: no cover - the schema admits only the kinds above
            raise ConfigError(f"models.{name}.kind: cannot train kind {mp.kind!r}")
        bar.update(task, completed=mp.train.steps)
        del model
        adapter = load_adapter(tmp)
        etask = bar.add_task(f"evaluate {name} on val", total=len(val_ds), info="")
        with torch.no_grad():
            val = evaluate(
                adapter, val_ds, prompts=params.benchmark.prompts, tick=lambda k: bar.advance(etask, k)
            )
    replace_dir(tmp, final)

    headline = HEADLINE[adapter.task]
    flat = headline_metrics(adapter.task, val)
    summary = {"task": adapter.task, "val": val, "train": history, "runtime": rt}
    with start_run(
        "train_model",
        run_name=f"train {name}",
        experiment=params.tracking.experiment,
        wandb_cfg=params.tracking.wandb,
        tags={"model": name},
    ) as r:
        r.log_params({"model": mp.model_dump(), "runtime": rt, "dataset": params.dataset.model_dump()})
        r.log_input(f"{params.dataset.name}-train", train_ds.fingerprint, train_ds.root, context="train")
        r.log_input(f"{params.dataset.name}-val", val_ds.fingerprint, val_ds.root, context="val")
        r.log_metrics({"train": history, "val": val})
        version, alias = register_model(
            final,
            name,
            description=(
                f"Embedded {mp.kind} trained by the BlueGlass pipeline for {mp.train.steps} steps on "
                f"'{params.dataset.name}' (seed {getattr(params.dataset, 'seed', None)}); metrics are on the val split. "
                f"Headline metric: {headline}."
            ),
            metrics={f"val.{k}": v for k, v in flat.items()} | {headline: flat.get(headline)},
            headline=headline,
            tags={"kind": mp.kind, "task": adapter.task, "dataset_fingerprint": train_ds.fingerprint},
        )
        summary["registry"] = {"name": name, "version": version, "alias": alias}
    write_json(base / "metrics" / f"train_{name}.json", {"val": val, "train": history})
    return summary
