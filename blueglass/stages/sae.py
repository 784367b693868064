"""``sae@<run>``: train the sparse autoencoders of one run on one Lens point (Lightning), evaluate, register.

A run is one SAE, or a ``sweep`` of several (variants / sizes) trained from one pass over the data. Writes
``models/saes/<run>/<member>/`` (SAELens layout), ``metrics/sae_<run>.json`` (per member: ``mse, fvu,
explained_variance, l0, dead_frac, dense_frac`` on the held-out shard, plus concept recovery on the toy
world), ``reports/latents/<run>/<member>/`` (image grids of the top latents' top tokens, a class × latent
heatmap, latents.json) and one MLflow run (training curves through Lightning's MLflow logger,
firing-frequency histograms, the latent images);
registers each member as ``<model>.<point>.sae-<variant>`` (champion = lowest FVU). Training checkpoints
go to ``checkpoints/sae/<run>/<fingerprint>/``: a run that was stopped resumes there, and the folder is
removed once the run has finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from blueglass.config import Params, SaeRun
from blueglass.errors import ConfigError
from blueglass.runtime import replace_dir, setup, write_json, write_text
from blueglass.tracking import main_run, register_model


def sae_config(spec: SaeRun, d_in: int, where: str):
    from blueglass.interp.sae import SAEConfig

    d_sae = spec.expansion * d_in
    try:
        return SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            variant=spec.variant,
            k=spec.k,
            l1_coeff=spec.l1_coeff,
            l0_coeff=spec.l0_coeff,
            aux_k=spec.aux_k,
            dead_tokens=spec.dead_tokens,
            matryoshka_prefixes=[d_sae // 4, d_sae // 2, d_sae] if spec.variant == "matryoshka" else [],
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def run(params: Params, base: Path, name: str, callbacks=()) -> dict[str, Any]:
    if params.sae is None or name not in params.sae.runs:
        known = ", ".join(params.sae.runs) if params.sae else "none"
        raise ConfigError(f"sae.runs.{name}: no such SAE run (runs: {known})")
    spec = params.sae.runs[name]
    from blueglass.features.extract import lens_md5
    from blueglass.features.lens import Lens

    lens_dir = base / "lens" / spec.lens
    lens = Lens(lens_dir)
    d_in = int(lens.point(spec.point)["d"])
    members = spec.members()
    cfgs = {
        m: sae_config(s, d_in, f"sae.runs.{name}" + (f".sweep.{m}" if spec.sweep else ""))
        for m, s in members.items()
    }
    lrs = {m: s.lr for m, s in members.items()}
    rt = setup(params.runtime)
    md5 = lens_md5(lens_dir)
    fingerprint = hashlib.sha256(
        json.dumps([spec.model_dump(), md5], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    ckpt_root = base / "checkpoints" / "sae" / name
    model = lens.manifest["model"]["name"]

    from blueglass.interp.train import TrainSettings, train_saes

    with main_run(
        "sae",
        run_name=f"sae {name}",
        experiment=params.tracking.experiment,
        wandb_cfg=params.tracking.wandb,
        tags={"lens": spec.lens, "point": spec.point, "members": ",".join(members)},
    ) as r:
        if r is not None:
            r.log_params({"sae": spec.model_dump(), "runtime": rt})
            r.log_input(f"lens-{spec.lens}", md5, lens_dir, context="lens")
        res = train_saes(
            lens_dir,
            spec.point,
            cfgs,
            TrainSettings(
                steps=spec.steps,
                batch_size=spec.batch_size,
                lr=None,
                seed=spec.seed,
                precision=spec.precision,
                devices=spec.devices,
                checkpoint_dir=ckpt_root / fingerprint,
                checkpoint_every=spec.checkpoint_every,
                run_id=r.run_id if r is not None else None,
            ),
            callbacks=callbacks,
            lrs=lrs,
        )
        if r is None:
            return {}
        from blueglass.stages.train_model import load_split

        split = lens.manifest.get("dataset", {}).get("split")
        images = {rec.id: rec.path for rec in load_split(params, base, split).images} if split else {}
        summary: dict[str, Any] = {}
        for member, out in res["saes"].items():
            summary[member] = _finish_member(
                r, base, name, member, members[member], out, res, lens, model, md5, images
            )
    shutil.rmtree(ckpt_root, ignore_errors=True)
    rows = ["member,variant,l0,fvu,dead_frac"] + [
        f"{m},{members[m].variant},{s['l0']:.6f},{s['fvu']:.6f},{s['dead_frac']:.6f}"
        for m, s in summary.items()
    ]
    write_text(base / "plots" / f"sae_{name}.csv", "\n".join(rows) + "\n")
    write_json(
        base / "metrics" / f"sae_{name}.json",
        {m: {k: v for k, v in s.items() if k not in ("lr", "registry")} for m, s in summary.items()},
    )
    return summary


def _finish_member(r, base, name, member, spec, out, res, lens, model, md5, images):
    """Save, log and register one trained SAE of the run; render its top latents (reports/latents/)."""
    from blueglass.interp.attribution import render_latents
    from blueglass.interp.concepts import best_latent_auroc

    sae = out["sae"]
    metrics = dict(out["metrics"])
    recovery = best_latent_auroc(out["heldout_codes"], res["heldout_meta"], lens.manifest.get("concepts", {}))
    folder = base / "models" / "saes" / name / member
    tmp = folder.with_name(f".{member}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save(tmp, hook_name=spec.point, lens=spec.lens, model=model, run=name, member=member)
    replace_dir(tmp, folder)
    hist = np.histogram(np.log10(out["firing_frequency"] + 1e-7), bins=20, range=(-7, 0))
    summary = {
        **metrics,
        "concept_recovery": {c: v["mean_best_auroc"] for c, v in recovery.items()},
        "steps": res["steps"],
        "lr": out["lr"],
    }
    r.log_metrics({member: summary})
    hist_path = base / "metrics" / f".sae_{name}_{member}_firing.json"
    write_json(
        hist_path,
        {
            "log10_frequency_bin_edges": hist[1].tolist(),
            "latents": hist[0].tolist(),
            "concept_recovery": recovery,
        },
    )
    r.log_artifact(hist_path, artifact_path=f"firing_frequency/{member}")
    hist_path.unlink()
    latents_dir = base / "reports" / "latents" / name / member
    shutil.rmtree(latents_dir, ignore_errors=True)
    render_latents(
        sae,
        lens,
        spec.point,
        images,
        latents_dir,
        recovery=recovery,
        classes={int(k): v for k, v in lens.manifest.get("categories", {}).items()},
    )
    r.log_artifacts(latents_dir, artifact_path=f"latents/{member}")
    reg = f"{model}.{spec.point}.sae-{spec.variant}"
    d_sae = sae.cfg.d_sae
    version, alias = register_model(
        folder,
        reg,
        description=(
            f"{spec.variant} SAE ({d_sae} latents, k={spec.k}) on {model} at {spec.point}, trained "
            f"{res['steps']} steps on Lens {spec.lens} (run {name}, member {member}). Held-out FVU "
            f"{metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_frac']:.1%}."
        ),
        metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
        headline="fvu",
        higher_is_better=False,
        tags={
            "lens": spec.lens,
            "point": spec.point,
            "variant": spec.variant,
            "sae_run": name,
            "sae_member": member,
            "lens_md5": md5,
        },
        input_dim=sae.cfg.d_in,
    )
    summary["registry"] = {"name": reg, "version": version, "alias": alias}
    return summary
