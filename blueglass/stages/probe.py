"""``probe@<run>``: linear probes on every point of a Lens, next to its random-init control Lens.

Writes ``models/probes/<run>/<point>/<target>/`` (probe.json + probe.safetensors), ``metrics/probe_<run>.json``,
``plots/probe_<run>.csv`` (the per-layer curve: one row per point, trained and control columns per target)
and one MLflow run; registers the probes of ``register_points`` × ``register_targets`` as
``<model>.<point>.probe-<target>``. A concept counts as *learned* at a point only where the trained model's
probe beats the control's by ``learned_margin``.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path
from typing import Any

from blueglass.config import Params
from blueglass.errors import ConfigError
from blueglass.runtime import progress, setup, write_json, write_text
from blueglass.tracking import is_main_process, main_run, register_model


def headline(kind: str) -> str:
    return "r2" if kind == "regression" else "accuracy"


def run(params: Params, base: Path, name: str) -> dict[str, Any]:
    if params.probe is None or name not in params.probe.runs:
        known = ", ".join(params.probe.runs) if params.probe else "none"
        raise ConfigError(f"probe.runs.{name}: no such probe run (runs: {known})")
    spec = params.probe.runs[name]
    from blueglass.features.extract import lens_md5
    from blueglass.features.lens import Lens
    from blueglass.interp.probes import ProbeSettings, default_targets, train_probes

    lens = Lens(base / "lens" / spec.lens)
    control = Lens(base / "lens" / spec.control) if spec.control else None
    known_targets = {t.name: t for t in default_targets(lens.manifest["meta_fields"])}
    unknown = [t for t in spec.targets if t not in known_targets]
    if unknown:
        raise ConfigError(
            f"probe.runs.{name}.targets: unknown target(s) {unknown} (known: {', '.join(known_targets)})"
        )
    for p in spec.register_points:
        lens.point(p)
    targets = [known_targets[t] for t in spec.targets]
    rt = setup(params.runtime)
    main = is_main_process()
    out_dir = base / "models" / "probes" / name
    tmp = out_dir.with_name(f".{name}.tmp")
    if main and tmp.exists():
        shutil.rmtree(tmp)
    model = lens.manifest["model"]["name"]
    pp = params.probe
    with main_run(
        "probe",
        run_name=f"probe {name}",
        experiment=params.tracking.experiment,
        wandb_cfg=params.tracking.wandb,
        tags={"lens": spec.lens, "model": model},
    ) as r:
        if r is not None:
            r.log_params({"probe": spec.model_dump(), **pp.model_dump(exclude={"runs"}), "runtime": rt})
            r.log_input(f"lens-{spec.lens}", lens_md5(lens.root), lens.root, context="lens")
            if control is not None:
                r.log_input(f"lens-{spec.control}", lens_md5(control.root), control.root, context="control")

        def settings(kind: str, point: str) -> ProbeSettings:
            return ProbeSettings(
                **pp.model_dump(exclude={"runs", "learned_margin"}),  # the training settings, by name
                run_id=r.run_id if r is not None else None,
                log_prefix=f"train/{kind}/{point}",
            )

        results: dict[str, dict[str, Any]] = {}
        curve: list[dict[str, Any]] = []
        with progress() as bar:
            task = bar.add_task(f"probe {name}", total=len(lens.points), info="")
            for depth, point in enumerate(lens.points):
                trained = train_probes(lens, point, targets, settings("trained", point))
                ctrl = {}
                if control is not None and point in control.points:
                    ctrl = train_probes(control, point, targets, settings("control", point))
                row: dict[str, Any] = {"depth": depth, "point": point}
                results[point] = {}
                for tname, res in trained.items():
                    h = headline(res.kind)
                    entry = dict(res.metrics)
                    if tname in ctrl:
                        entry.update({f"control_{k}": v for k, v in ctrl[tname].metrics.items()})
                        entry["learned"] = bool(res.metrics[h] - ctrl[tname].metrics[h] > pp.learned_margin)
                    results[point][tname] = entry
                    row[tname] = round(res.metrics[h], 6)
                    if tname in ctrl:
                        row[f"{tname}_control"] = round(ctrl[tname].metrics[h], 6)
                    if main:
                        res.save(tmp / point / tname, lens=spec.lens, point=point, control=spec.control)
                curve.append(row)
                bar.advance(task, 1)
        if r is None:
            return {}
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)

        columns = ["depth", "point"] + sorted({k for row in curve for k in row} - {"depth", "point"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(curve)
        plot = base / "plots" / f"probe_{name}.csv"
        write_text(plot, buf.getvalue())
        r.log_metrics(
            {
                p.replace(":", "_"): {
                    t: {k: v for k, v in m.items() if not isinstance(v, bool)} for t, m in ts.items()
                }
                for p, ts in results.items()
            }
        )
        r.log_artifact(plot)
        registered = {}
        for point in spec.register_points:
            for tname in spec.register_targets:
                if tname not in results.get(point, {}):
                    continue
                m = results[point][tname]
                h = "r2" if "r2" in m else "accuracy"
                reg = f"{model}.{point}.probe-{tname}"
                version, alias = register_model(
                    out_dir / point / tname,
                    reg,
                    description=(
                        f"Linear probe for '{tname}' on {model} at {point}, trained on Lens {spec.lens}. "
                        f"Test {h} {m[h]:.3f}"
                        + (
                            f" vs {m.get('control_' + h, float('nan')):.3f} for the random-init control"
                            if spec.control
                            else ""
                        )
                    ),
                    metrics={h: m[h], **{k: v for k, v in m.items() if isinstance(v, float)}},
                    headline=h,
                    tags={
                        "lens": spec.lens,
                        "point": point,
                        "target": tname,
                        "learned": str(m.get("learned", "")),
                    },
                    input_dim=lens.point(point)["d"],
                )
                registered[reg] = {"version": version, "alias": alias}
    write_json(base / "metrics" / f"probe_{name}.json", results)
    return {"results": results, "registered": registered, "curve": curve}
