"""``patch@<run>``: re-run a model's benchmark with interventions in place and measure what survives.

For each intervention of the run (SAE reconstruction ± error term, steering by a probe direction, latent
clamp), at its site (the SAE's or probe's point): ``metric_clean`` (computed once), ``metric_patched``,
``metric_zero_ablation`` and ``metric_mean_ablation`` (the Lens' per-dimension mean), and
``recovered = (patched − zero) / (clean − zero)`` on the run's task metric; the SAE reconstructions are
also applied all together (``joint``) when they sit at more than one point.

Writes ``models/patched/<run>/<intervention>/patch.json`` (the registry URIs of the base model and the
SAE / probe, plus the intervention), ``metrics/patch_<run>.json`` and ``plots/patch_<run>.csv``; logs a
parent MLflow run with one nested run per evaluation; registers each patched model as
``<model>+<intervention>@<point>`` (a pyfunc that loads the base model and the intervention from the
registry and applies it) and tags the SAE's own registry version with ``recovered``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from blueglass.config import InterventionSpec, Params
from blueglass.errors import ConfigError
from blueglass.runtime import progress, replace_dir, setup, write_json, write_text
from blueglass.tracking import find_version, register_model, start_run, tag_versions_by_weights


def recovered(clean: float | None, patched: float | None, zero: float | None) -> float | None:
    """``(patched − zero) / (clean − zero)``; undefined when the ablation does not hurt the metric."""
    if clean is None or patched is None or zero is None or abs(clean - zero) < 1e-9:
        return None
    return (patched - zero) / (clean - zero)


def _metric(m: dict[str, Any], name: str) -> float | None:
    v = m.get(name)
    return float(v) if isinstance(v, int | float) else None


def _resolve(params: Params, base: Path, name: str, iv_name: str, iv: InterventionSpec, model: str):
    """Load what an intervention needs; return (JSON spec, loaded objects, registry refs)."""
    from blueglass.interp.probes import ProbeResult
    from blueglass.interp.sae import SparseAutoencoder
    from blueglass.models.base import weights_sha256

    where = f"patch.runs.{name}.interventions.{iv_name}"
    spec: dict[str, Any] = {"kind": iv.kind, "tokens": iv.tokens}
    loaded: dict[str, Any] = {}
    uses: dict[str, str] = {}
    if iv.sae:
        run, member = iv.sae.split("/")
        folder = base / "models" / "saes" / run / member
        if not (folder / "cfg.json").is_file():
            raise ConfigError(f"{where}.sae: {folder} not found (run `blueglass sae {run}` first)")
        cfg = json.loads((folder / "cfg.json").read_text())
        spec["point"] = cfg["blueglass"]["hook_name"]
        loaded["sae"] = SparseAutoencoder.load(folder).eval()
        loaded["sae_ref"] = (
            f"{model}.{spec['point']}.sae-{loaded['sae'].cfg.variant}",
            weights_sha256(folder),
        )
    if iv.probe:
        run, point, target = iv.probe.split("/")
        folder = base / "models" / "probes" / run / point / target
        if not (folder / "probe.json").is_file():
            raise ConfigError(f"{where}.probe: {folder} not found (run `blueglass probe {run}` first)")
        probe = ProbeResult.load(folder)
        spec["point"] = point
        cls = None
        if iv.target_class is not None:
            cls = _class_id(base, folder, probe, iv.target_class, f"{where}.target_class", target)
        loaded["direction"] = probe.direction(cls)
        spec["target_class"] = cls
        spec["alpha"] = iv.alpha
        loaded["probe_ref"] = (f"{model}.{point}.probe-{target}", weights_sha256(folder))
    if iv.kind == "clamp":
        spec["value"] = iv.value
        spec["latents"] = list(iv.latents) or _concept_latents(
            params, base, loaded["sae"], spec["point"], iv, where
        )
    for key, ref in (("sae", loaded.get("sae_ref")), ("probe", loaded.get("probe_ref"))):
        if ref:
            v = find_version(*ref)
            if v:
                uses[key] = f"{ref[0]}/{v}"
                spec[f"{key}_uri"] = f"models:/{ref[0]}/{v}"
    return spec, loaded, uses


def _class_id(base: Path, folder: Path, probe, value: str, where: str, target: str) -> int:
    """A probe class from its id or its name, named by the probe's own Lens (concept values are indices
    into the concept's vocabulary; class targets use the dataset's category ids)."""
    if value.lstrip("-").isdigit() and int(value) in probe.classes:
        return int(value)
    lens = json.loads((folder / "probe.json").read_text()).get("lens")
    manifest = base / "lens" / str(lens) / "manifest.json"
    names: dict[str, int] = {}
    if manifest.is_file():
        man = json.loads(manifest.read_text())
        if target in man.get("concepts", {}):
            names = {v: i for i, v in enumerate(man["concepts"][target])}
        else:
            names = {v: int(k) for k, v in man.get("categories", {}).items()}
    if value in names and names[value] in probe.classes:
        return names[value]
    raise ConfigError(
        f"{where}: {value!r} is not a class of this probe (classes: {probe.classes}, names: {sorted(names)})"
    )


def _concept_latents(params, base, sae, point, iv: InterventionSpec, where: str) -> list[int]:
    """The SAE latents whose activation separates ``concept=value`` tokens (AUROC ≥ min_auroc) on the
    held-out shard of the SAE's Lens."""
    import torch

    from blueglass.features.lens import Lens
    from blueglass.interp.concepts import best_latent_auroc

    concept, value = iv.concept.split("=", 1)
    cfg = json.loads((base / "models" / "saes" / iv.sae / "cfg.json").read_text())
    lens = Lens(base / "lens" / cfg["blueglass"]["lens"])
    vocab = lens.manifest.get("concepts", {}).get(concept)
    if vocab is None or value not in vocab:
        raise ConfigError(
            f"{where}.concept: no concept value {iv.concept!r} in Lens {cfg['blueglass']['lens']}"
        )
    blocks = list(lens.read_shard(lens.shards(point)[-1]))
    feats = np.concatenate([b.feats for b in blocks])
    meta = np.concatenate([b.meta for b in blocks])
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(feats).float()).numpy()
    rec = best_latent_auroc(codes, meta, {concept: vocab}, top=16).get(concept, {}).get("values", {})
    latents = [j for j, auc in rec.get(value, {}).get("top", []) if auc >= iv.min_auroc]
    if not latents:
        raise ConfigError(f"{where}.concept: no latent separates {iv.concept} with AUROC ≥ {iv.min_auroc}")
    return latents


def run(params: Params, base: Path, name: str) -> dict[str, Any]:
    if params.patch is None or name not in params.patch.runs:
        known = ", ".join(params.patch.runs) if params.patch else "none"
        raise ConfigError(f"patch.runs.{name}: no such patch run (runs: {known})")
    spec = params.patch.runs[name]
    import torch

    from blueglass.evaluation.runner import evaluate
    from blueglass.features.extract import lens_md5
    from blueglass.features.lens import Lens
    from blueglass.features.patch import FeaturePatcher, patch_from_spec
    from blueglass.models import model_location, open_model
    from blueglass.models.base import weights_sha256
    from blueglass.stages.train_model import load_split

    ds = load_split(params, base, spec.split)
    lens = Lens(base / "lens" / spec.lens)
    model_dir = model_location(params, base, spec.model)
    rt = setup(params.runtime)
    adapter = open_model(params, base, spec.model, device=rt["device"])
    base_sha = weights_sha256(model_dir)
    base_version = find_version(spec.model, base_sha)
    resolved = {n: _resolve(params, base, name, n, iv, spec.model) for n, iv in spec.interventions.items()}
    sites = sorted({s["point"] for s, _, _ in resolved.values()})
    for p in sites:
        lens.point(p)  # the mean ablation needs the site in the Lens
    bp = params.benchmark

    def evaluate_with(patches, label: str, bar) -> dict[str, Any]:
        task = bar.add_task(f"patch {name}: {label}", total=len(ds), info="")
        with FeaturePatcher(adapter, patches), torch.no_grad():
            return evaluate(
                adapter,
                ds,
                batch_size=params.patch.batch_size,
                prompts=bp.prompts,
                tick=lambda k, t=task: bar.advance(t, k),
            )

    def ablations(points: list[str], kind: str):
        return [patch_from_spec({"kind": kind, "point": p}, mean=lens.point(p)["mean"]) for p in points]

    with progress() as bar:
        clean = evaluate_with([], "clean", bar)
        metric = spec.metric  # checked on the clean run, before the other evaluations
        if _metric(clean, metric) is None:
            raise ConfigError(
                f"patch.runs.{name}.metric: '{metric}' is not a metric of this task "
                f"(metrics: {', '.join(k for k, v in clean.items() if isinstance(v, float))})"
            )
        site_results = {
            p: {
                "zero_ablation": evaluate_with(ablations([p], "zero"), f"zero@{p}", bar),
                "mean_ablation": evaluate_with(ablations([p], "mean"), f"mean@{p}", bar),
            }
            for p in sites
        }
        patched = {}
        for n, (s, loaded, _) in resolved.items():
            patch = patch_from_spec(s, sae=loaded.get("sae"), direction=loaded.get("direction"))
            patched[n] = evaluate_with([patch], n, bar)
        sae_ivs = [n for n, (s, _, _) in resolved.items() if s["kind"] == "sae"]
        joint_sites = sorted({resolved[n][0]["point"] for n in sae_ivs})
        joint = None
        if len(joint_sites) > 1:
            joint_patches = [patch_from_spec(resolved[n][0], sae=resolved[n][1]["sae"]) for n in sae_ivs]
            joint = {
                "patched": evaluate_with(joint_patches, "joint", bar),
                "zero": evaluate_with(ablations(joint_sites, "zero"), "joint zero", bar),
                "mean": evaluate_with(ablations(joint_sites, "mean"), "joint mean", bar),
            }

    def row(kind: str, points: list[str], m_patched, m_zero, m_mean) -> dict[str, Any]:
        c, p, z, a = (_metric(x, metric) for x in (clean, m_patched, m_zero, m_mean))
        return {
            "kind": kind,
            "sites": points,
            "metric_clean": c,
            "metric_patched": p,
            "metric_zero_ablation": z,
            "metric_mean_ablation": a,
            "recovered": recovered(c, p, z),
            "recovered_vs_mean": recovered(c, p, a),
            "patched": m_patched,
        }

    out: dict[str, Any] = {
        "model": spec.model,
        "split": spec.split,
        "metric": metric,
        "clean": clean,
        "sites": site_results,
        "interventions": {},
    }
    folder_root = base / "models" / "patched" / name
    tmp_root = folder_root.with_name(f".{name}.tmp")
    shutil.rmtree(tmp_root, ignore_errors=True)
    with start_run(
        "patch",
        run_name=f"patch {name}",
        experiment=params.tracking.experiment,
        wandb_cfg=params.tracking.wandb,
        tags={"model": spec.model, "split": spec.split, "lens": spec.lens},
    ) as parent:
        parent.log_params({"patch": spec.model_dump(), "runtime": rt})
        parent.log_input(spec.model, base_sha, model_dir, context="model")
        parent.log_input(f"{params.dataset.name}-{spec.split}", ds.fingerprint, ds.root, context="eval")
        parent.log_input(f"lens-{spec.lens}", lens_md5(lens.root), lens.root, context="lens")
        parent.log_metrics({"clean": {k: v for k, v in clean.items() if isinstance(v, float)}})
        for n, (s, loaded, uses) in resolved.items():
            site = s["point"]
            r = row(
                s["kind"],
                [site],
                patched[n],
                site_results[site]["zero_ablation"],
                site_results[site]["mean_ablation"],
            )
            folder = tmp_root / n
            folder.mkdir(parents=True)
            doc = {
                "base_uri": f"models:/{spec.model}/{base_version}" if base_version else None,
                "intervention": s,
                "metric": metric,
                "recovered": r["recovered"],
            }
            (folder / "patch.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            with start_run(
                "patch",
                run_name=f"{spec.model}+{n}@{site}",
                experiment=params.tracking.experiment,
                nested=True,
                tags={"intervention": n, "kind": s["kind"], "point": site, **uses},
            ) as child:
                child.log_params({"intervention": s})
                child.log_metrics({k: v for k, v in r.items() if isinstance(v, float)})
                reg = f"{spec.model}+{n}@{site}"
                version, alias = None, None
                if base_version:
                    version, alias = register_model(
                        folder,
                        reg,
                        description=(
                            f"{spec.model} with '{n}' ({s['kind']}) at {site}. {metric}: clean "
                            f"{r['metric_clean']:.3f}, patched {r['metric_patched']:.3f}, zero-ablated "
                            f"{r['metric_zero_ablation']:.3f} → recovered "
                            + (f"{r['recovered']:.3f}" if r["recovered"] is not None else "undefined")
                        ),
                        metrics={k: v for k, v in r.items() if isinstance(v, float)},
                        headline="recovered" if r["recovered"] is not None else "metric_patched",
                        tags={
                            "base": f"{spec.model}/{base_version}",
                            "point": site,
                            "kind": s["kind"],
                            **uses,
                        },
                    )
            r["registry"] = {"name": reg, "version": version, "alias": alias}
            r["uses"] = uses
            if s["kind"] == "sae" and "sae_ref" in loaded and r["recovered"] is not None:
                tag_versions_by_weights(
                    *loaded["sae_ref"],
                    {
                        "recovered": f"{r['recovered']:.6g}",
                        "recovered.metric": metric,
                        f"patched.{metric}": f"{r['metric_patched']:.6g}",
                    },
                )
            out["interventions"][n] = r
        if joint is not None:
            out["joint"] = row("sae", joint_sites, joint["patched"], joint["zero"], joint["mean"])
            parent.log_metrics({"joint": {k: v for k, v in out["joint"].items() if isinstance(v, float)}})
        parent.log_metrics(
            {n: {k: v for k, v in r.items() if isinstance(v, float)} for n, r in out["interventions"].items()}
        )
        replace_dir(tmp_root, folder_root)
        write_json(base / "metrics" / f"patch_{name}.json", _without_full_metrics(out))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            ["intervention", "site", "clean", "patched", "zero_ablation", "mean_ablation", "recovered"]
        )
        rows = list(out["interventions"].items()) + ([("joint", out["joint"])] if "joint" in out else [])
        for n, r in rows:
            w.writerow(
                [n, "+".join(r["sites"])]
                + [
                    _round(r[k])
                    for k in (
                        "metric_clean",
                        "metric_patched",
                        "metric_zero_ablation",
                        "metric_mean_ablation",
                        "recovered",
                    )
                ]
            )
        write_text(base / "plots" / f"patch_{name}.csv", buf.getvalue())
        parent.log_artifact(base / "plots" / f"patch_{name}.csv")
    return out


def _round(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _without_full_metrics(out: dict[str, Any]) -> dict[str, Any]:
    """The metrics file keeps the headline numbers (full per-evaluation metrics go to MLflow)."""
    keep = dict(out)
    keep["interventions"] = {
        n: {k: v for k, v in r.items() if k != "patched"} for n, r in out["interventions"].items()
    }
    if "joint" in keep:
        keep["joint"] = {k: v for k, v in out["joint"].items() if k != "patched"}
    return keep
