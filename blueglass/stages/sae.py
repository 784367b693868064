"""``sae@<run>``: train one sparse autoencoder on one Lens point (Lightning), evaluate, register.

Writes ``models/saes/<run>/`` (SAELens layout), ``metrics/sae_<run>.json`` (``mse, fvu,
explained_variance, l0, dead_frac, dense_frac`` on the held-out shard, plus concept recovery on the toy
world) and one MLflow run with the firing-frequency histogram; registers ``<model>.<point>.sae-<variant>``
(champion = lowest FVU).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from blueglass.config import Params
from blueglass.errors import ConfigError
from blueglass.runtime import setup, write_json
from blueglass.tracking import register_model, start_run


def run(params: Params, base: Path, name: str) -> dict[str, Any]:
    if params.sae is None or name not in params.sae.runs:
        known = ", ".join(params.sae.runs) if params.sae else "none"
        raise ConfigError(f"sae.runs.{name}: no such SAE run (runs: {known})")
    spec = params.sae.runs[name]
    from blueglass.features.extract import lens_md5
    from blueglass.features.lens import Lens
    from blueglass.interp.sae import SAEConfig

    lens_dir = base / "lens" / spec.lens
    lens = Lens(lens_dir)
    info = lens.point(spec.point)
    d_in = int(info["d"])
    try:
        cfg = SAEConfig(
            d_in=d_in,
            d_sae=spec.expansion * d_in,
            variant=spec.variant,
            k=spec.k,
            l1_coeff=spec.l1_coeff,
            l0_coeff=spec.l0_coeff,
            aux_k=spec.aux_k,
            dead_tokens=spec.dead_tokens,
            matryoshka_prefixes=[
                spec.expansion * d_in // 4,
                spec.expansion * d_in // 2,
                spec.expansion * d_in,
            ]
            if spec.variant == "matryoshka"
            else [],
        )
    except ValueError as exc:
        raise ConfigError(f"sae.runs.{name}: {exc}") from None
    rt = setup(params.runtime)

    from blueglass.interp.concepts import best_latent_auroc
    from blueglass.interp.train import TrainSettings, train_sae

    res = train_sae(
        lens_dir,
        spec.point,
        cfg,
        TrainSettings(
            steps=spec.steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            seed=spec.seed,
            precision=spec.precision,
            devices=spec.devices,
        ),
    )
    if res["rank"] != 0:
        return {}
    sae = res["sae"]
    metrics = dict(res["metrics"])
    recovery = best_latent_auroc(res["heldout_codes"], res["heldout_meta"], lens.manifest.get("concepts", {}))

    out = base / "models" / "saes" / name
    tmp = out.with_name(f".{name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = lens.manifest["model"]["name"]
    sae.save(tmp, hook_name=spec.point, lens=spec.lens, model=model, run=name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    hist = np.histogram(np.log10(res["firing_frequency"] + 1e-7), bins=20, range=(-7, 0))
    summary = {
        **metrics,
        "concept_recovery": {c: v["mean_best_auroc"] for c, v in recovery.items()},
        "steps": res["steps"],
        "lr": res["lr"],
    }
    with start_run(
        "sae",
        run_name=f"sae {name}",
        experiment=params.tracking.experiment,
        wandb_cfg=params.tracking.wandb,
        tags={"lens": spec.lens, "point": spec.point, "variant": spec.variant},
    ) as r:
        r.log_params({"sae": spec.model_dump(), "d_sae": cfg.d_sae, "lr_used": res["lr"], "runtime": rt})
        r.log_input(f"lens-{spec.lens}", lens_md5(lens_dir), lens_dir, context="lens")
        r.log_metrics(summary)
        hist_path = base / "metrics" / f".sae_{name}_firing.json"
        write_json(
            hist_path,
            {
                "log10_frequency_bin_edges": hist[1].tolist(),
                "latents": hist[0].tolist(),
                "concept_recovery": recovery,
            },
        )
        r.log_artifact(hist_path, artifact_path="firing_frequency")
        hist_path.unlink()
        reg = f"{model}.{spec.point}.sae-{spec.variant}"
        version, alias = register_model(
            out,
            reg,
            description=(
                f"{spec.variant} SAE ({cfg.d_sae} latents, k={spec.k}) on {model} at {spec.point}, trained "
                f"{res['steps']} steps on Lens {spec.lens}. Held-out FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, "
                f"dead {metrics['dead_frac']:.1%}."
            ),
            metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
            headline="fvu",
            higher_is_better=False,
            tags={
                "lens": spec.lens,
                "point": spec.point,
                "variant": spec.variant,
                "lens_md5": lens_md5(lens_dir),
            },
            input_dim=d_in,
        )
    summary["registry"] = {"name": reg, "version": version, "alias": alias}
    write_json(
        base / "metrics" / f"sae_{name}.json",
        {k: v for k, v in summary.items() if k not in ("lr", "registry")},
    )
    return summary
