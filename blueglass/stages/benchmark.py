"""``benchmark``: evaluate every model × split pair in ``benchmark.runs``.

Writes ``metrics/benchmark.json`` (``{"<model>@<split>": {metrics}}``) and ``reports/benchmark.md``;
logs one parent MLflow run per invocation with one nested run per pair, and tags the registered version
whose weights were evaluated with the test metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blueglass.config import Params
from blueglass.evaluation.runner import evaluate, headline_metrics
from blueglass.runtime import progress, setup, write_json, write_text
from blueglass.stages.train_model import load_split
from blueglass.tracking import start_run, tag_versions_by_weights


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(results: dict[str, dict[str, Any]]) -> str:
    """The benchmark as a Markdown table (one row per model × split)."""
    det_cols = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]
    lines = ["# Benchmark", ""]
    det = {k: v for k, v in results.items() if v["task"] == "detection"}
    zs = {k: v for k, v in results.items() if v["task"] == "zero_shot"}
    cls = {k: v for k, v in results.items() if v["task"] in ("classification", "embedding")}
    if det:
        lines += [
            "## Detection (COCO box metrics)",
            "",
            "| model@split | images | " + " | ".join(det_cols) + " |",
        ]
        lines.append("|" + "---|" * (len(det_cols) + 2))
        for key, m in det.items():
            lines.append(f"| {key} | {m['images']} | " + " | ".join(_fmt(m.get(c)) for c in det_cols) + " |")
        lines += ["", "Per-class AP:", ""]
        for key, m in det.items():
            lines.append(f"- {key}: " + ", ".join(f"{c} {_fmt(v)}" for c, v in m["per_class"].items()))
        lines.append("")
    if zs:
        fams = sorted(
            {f for m in zs.values() for f, v in m.items() if isinstance(v, dict) and "accuracy" in v}
        )
        lines += ["## Zero-shot classification (accuracy, single-object images)", ""]
        lines.append("| model@split | images | mean | " + " | ".join(fams) + " |")
        lines.append("|" + "---|" * (len(fams) + 3))
        for key, m in zs.items():
            cells = [_fmt(m.get(f, {}).get("accuracy")) for f in fams]
            lines.append(f"| {key} | {m['images']} | {_fmt(m.get('accuracy'))} | " + " | ".join(cells) + " |")
        lines.append("")
    if cls:
        lines += ["## Classification (accuracy, single-object images)", ""]
        lines += ["| model@split | task | images | accuracy |", "|---|---|---|---|"]
        for key, m in cls.items():
            lines.append(f"| {key} | {m['task']} | {m['images']} | {_fmt(m.get('accuracy'))} |")
        lines.append("")
    return "\n".join(lines)


def run(params: Params, base: Path) -> dict[str, dict[str, Any]]:
    from blueglass.models import model_location, open_model

    bp = params.benchmark
    # Resolve every input before any work, so a missing model or split fails fast with nothing written.
    pairs = []
    for run_ in bp.runs:
        folder = model_location(params, base, run_.model)
        pairs.append((run_, folder, load_split(params, base, run_.split)))
    rt = setup(params.runtime)
    import torch

    results: dict[str, dict[str, Any]] = {}
    with (
        start_run(
            "benchmark",
            run_name="benchmark",
            experiment=params.tracking.experiment,
            wandb_cfg=params.tracking.wandb,
        ) as parent,
        progress() as bar,
    ):
        parent.log_params({"benchmark": bp.model_dump(), "runtime": rt})
        for run_, folder, ds in pairs:
            key = f"{run_.model}@{run_.split}"
            adapter = open_model(params, base, run_.model, device=rt["device"])
            task = bar.add_task(f"benchmark {key}", total=len(ds), info="")
            with torch.no_grad():
                m = evaluate(
                    adapter,
                    ds,
                    batch_size=bp.batch_size,
                    prompts=bp.prompts,
                    tick=lambda k, t=task: bar.advance(t, k),
                )
            m["task"] = adapter.task
            results[key] = m
            sha = adapter.weights_sha256
            with start_run(
                "benchmark",
                run_name=key,
                experiment=params.tracking.experiment,
                nested=True,
                tags={"model": run_.model, "split": run_.split},
            ) as child:
                child.log_params({"model": run_.model, "split": run_.split, "batch_size": bp.batch_size})
                child.log_input(
                    f"{params.dataset.name}-{run_.split}", ds.fingerprint, ds.root, context="eval"
                )
                child.log_input(run_.model, sha, folder, context="model")
                child.log_metrics({k: v for k, v in m.items() if k != "task"})
            flat = headline_metrics(adapter.task, m)
            tag_versions_by_weights(
                run_.model, sha, {f"metric.{run_.split}.{k}": f"{v:.6g}" for k, v in flat.items()}
            )
        # MLflow metric names cannot hold "@": model@split becomes model/split there.
        parent.log_metrics(
            {key.replace("@", "/"): headline_metrics(m["task"], m) for key, m in results.items()}
        )
        md = table(results)
        write_text(base / "reports" / "benchmark.md", md + "\n")
        parent.log_artifact(base / "reports" / "benchmark.md")
    write_json(base / "metrics" / "benchmark.json", results)
    return results
