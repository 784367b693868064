"""The ``blueglass`` command line: one command per pipeline stage plus utilities.

Heavy libraries (torch, transformers, mlflow) are imported inside commands so ``blueglass --help``
answers at once. A user mistake (bad params, missing path, unknown model) prints one line on stderr and
exits with status 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="blueglass",
    help="BlueGlass: benchmark vision / vision-language models, record their activations, probe and patch them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(help="Inspect and curate the MLflow Model Registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
lens_app = typer.Typer(help="Inspect and verify Lens datasets.", no_args_is_help=True)
app.add_typer(lens_app, name="lens")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Params file (paths in it are relative to its folder).")
]


@app.callback()
def _main() -> None:
    from blueglass.runtime import quiet_libraries  # env vars only: cheap

    quiet_libraries()


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def user_errors(fn):
    """Turn :class:`BlueGlassError` into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from blueglass.errors import BlueGlassError

        try:
            return fn(*args, **kwargs)
        except BlueGlassError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _load(params: Path):
    from blueglass.config import load_params

    p = load_params(params)
    return p, params.resolve().parent


@app.command()
@user_errors
def prepare(params: ParamsOpt = Path("params.yaml")) -> None:
    """Generate the toy-world dataset (COCO format) for every split in dataset.splits."""
    p, base = _load(params)
    from blueglass.stages import prepare as stage

    summary = stage.run(p, base)
    for name, s in summary.items():
        typer.echo(f"{name}: {s['images']} images, {s['objects']} objects")


@app.command("train-model")
@user_errors
def train_model(
    name: Annotated[str, typer.Argument(help="A key of the models section, e.g. toy-detector.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train an embedded model, evaluate it on val, save it to models/NAME and register it in MLflow."""
    p, base = _load(params)
    from blueglass.stages import train_model as stage

    s = stage.run(p, base, name)
    reg = s["registry"]
    from blueglass.evaluation.runner import headline_metrics

    flat = headline_metrics(s["task"], s["val"])
    shown = ", ".join(f"{k} {v:.3f}" for k, v in flat.items())
    typer.echo(f"{name}: val {shown}; registered version {reg['version']} as {reg['alias']}")


@app.command()
@user_errors
def benchmark(params: ParamsOpt = Path("params.yaml")) -> None:
    """Evaluate every model × split in benchmark.runs; write metrics/benchmark.json and reports/benchmark.md."""
    p, base = _load(params)
    from blueglass.stages import benchmark as stage

    results = stage.run(p, base)
    typer.echo(stage.table(results))


@app.command()
@user_errors
def extract(
    name: Annotated[str, typer.Argument(help="A key of extract.lenses, e.g. toy-detector-test.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Record a Lens (activations + per-token metadata) into lens/NAME. Under torchrun, ranks split the images."""
    p, base = _load(params)
    from blueglass.stages import extract as stage

    s = stage.run(p, base, name)
    if s is not None:
        typer.echo(
            f"{name}: {s['points']} point(s), {s['images']} images, {s['rows']} rows, "
            f"{s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s; md5 {s['md5']}"
        )


@app.command()
@user_errors
def probe(
    name: Annotated[str, typer.Argument(help="A key of probe.runs.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train linear probes on every point of a Lens (and its random-init control); write the per-layer curve."""
    p, base = _load(params)
    from blueglass.stages import probe as stage

    out = stage.run(p, base, name)
    for row in out["curve"]:
        cells = ", ".join(
            f"{k} {v:.3f}"
            for k, v in row.items()
            if k not in ("depth", "point") and not k.endswith("_control")
        )
        typer.echo(f"{row['point']}: {cells}")
    for reg, v in out["registered"].items():
        typer.echo(f"registered {reg} v{v['version']} as {v['alias']}")


@app.command()
@user_errors
def sae(
    name: Annotated[str, typer.Argument(help="A key of sae.runs.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train the sparse autoencoder(s) of one run on one Lens point (Lightning; DDP under torchrun; a sweep
    trains several from one pass), evaluate them on the held-out shard and register them."""
    p, base = _load(params)
    from blueglass.stages import sae as stage

    for member, s in stage.run(p, base, name).items():
        rec = ", ".join(f"{c} {v:.3f}" for c, v in s["concept_recovery"].items())
        typer.echo(
            f"{name}/{member}: fvu {s['fvu']:.3f}, l0 {s['l0']:.1f}, dead {s['dead_frac']:.1%}, dense {s['dense_frac']:.1%}"
            + (f"; concept recovery (mean best-latent AUROC) {rec}" if rec else "")
            + f"; registered {s['registry']['name']} v{s['registry']['version']} as {s['registry']['alias']}"
        )


@app.command()
@user_errors
def patch(
    name: Annotated[str, typer.Argument(help="A key of patch.runs.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Re-run a model's benchmark with each intervention of a patch run (SAE reconstruction, steering, latent
    clamp) and its zero / mean ablation baselines; report `recovered` and register the patched models."""
    p, base = _load(params)
    from blueglass.stages import patch as stage

    out = stage.run(p, base, name)
    m = out["metric"]
    rows = list(out["interventions"].items()) + ([("joint", out["joint"])] if "joint" in out else [])
    for n, r in rows:
        rec = "undefined" if r["recovered"] is None else f"{r['recovered']:.3f}"
        typer.echo(
            f"{name}/{n} at {'+'.join(r['sites'])}: {m} clean {r['metric_clean']:.3f}, patched "
            f"{r['metric_patched']:.3f}, zero {r['metric_zero_ablation']:.3f}, mean {r['metric_mean_ablation']:.3f}"
            f" → recovered {rec}"
        )


@app.command()
@user_errors
def report(
    params: ParamsOpt = Path("params.yaml"),
    screenshot: Annotated[
        Path | None,
        typer.Option("--screenshot", help="Also render the page in headless Chromium to this PNG."),
    ] = None,
) -> None:
    """Build reports/index.html (static, offline) from what the stages have written; print its path."""
    p, base = _load(params)
    from blueglass.stages import report as stage

    out = stage.run(p, base, screenshot=screenshot)
    missing = [k for k, present in out["sections"].items() if not present]
    if missing:
        typer.echo(f"not run yet: {', '.join(missing)}", err=True)
    if "screenshot" in out:
        typer.echo(f"screenshot: {out['screenshot']}", err=True)
    typer.echo(str(out["index"]))


@lens_app.command("info")
@user_errors
def lens_info(root: Annotated[str, typer.Argument(help="Lens folder or URL.")]) -> None:
    """Points, dimensions, rows, size and lineage of a Lens."""
    from blueglass.features.lens import Lens

    lens = Lens(root)
    m = lens.manifest
    typer.echo(f"Lens {m.get('name', root)} (schema {m['schema_version']}, {m['created_by']})")
    model = m["model"]
    if model.get("control"):
        weights = f"RANDOM INIT (seed {model['control']['seed']}) of weights {model['control']['random_init_of'][:16]}…"
    else:
        weights = f"weights sha256 {model['weights_sha256'][:16]}…"
    typer.echo(f"  model:   {model['name']} ({model['adapter']}) {weights}")
    ds = m["dataset"]
    typer.echo(
        f"  dataset: {ds['name']}/{ds['split']} ({ds['images']} images) fingerprint {ds['fingerprint'][:16]}…"
    )
    typer.echo(
        f"  blocks:  {m['block_images']} images per sample, {m['blocks_per_shard']} samples per shard, {m['ranks']} rank(s)"
    )
    width = max(len(p) for p in lens.points)
    for name in lens.points:
        pt = lens.point(name)
        lay = pt["layout"]
        kinds = "+".join(f"{n} {k}" for k, n in lay["kinds"].items())
        typer.echo(
            f"  {name:<{width}}  d={pt['d']:<5} {pt['dtype']:<8} rows={pt['rows']:<9} images={pt['images']:<7} "
            f"{pt['bytes'] / 1e6:8.1f} MB  shards={len(pt['shards']):<4} tokens/image={lay['tokens_per_image']} ({kinds})"
        )


@lens_app.command("verify")
@user_errors
def lens_verify(root: Annotated[str, typer.Argument(help="Lens folder or URL.")]) -> None:
    """Re-hash every shard and check its row count; exit 1 on any mismatch."""
    from blueglass.features.lens import Lens

    lens = Lens(root)
    problems = lens.verify()
    n = sum(len(lens.shards(p)) for p in lens.points)
    if problems:
        for msg in problems:
            typer.echo(f"FAIL {msg}", err=True)
        typer.echo(f"{len(problems)} problem(s) in {n} shard(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK: {n} shard(s) of {len(lens.points)} point(s) verified")


@lens_app.command("head")
@user_errors
def lens_head(
    root: Annotated[str, typer.Argument(help="Lens folder or URL.")],
    point: Annotated[str, typer.Option("--point", "-p", help="Point name (see `lens info`).")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="How many rows.")] = 5,
) -> None:
    """The first rows of a point: metadata columns and the first feature values."""
    import numpy as np

    from blueglass.features.lens import Lens

    lens = Lens(root)
    lens.point(point)
    block = next(lens.blocks(point, lens.shards(point)[:1]), None)
    if block is None:
        typer.echo("(no rows)")
        return
    names = block.meta.dtype.names
    typer.echo(" | ".join(names) + " | feats[:4]")
    for i in range(min(rows, len(block.feats))):
        rec = block.meta[i]
        cells = [
            np.array2string(rec[n], precision=1, separator=",")
            if np.ndim(rec[n])
            else f"{rec[n]:.3g}"
            if isinstance(rec[n], np.floating)
            else str(rec[n])
            for n in names
        ]
        typer.echo(
            " | ".join(cells)
            + " | "
            + np.array2string(block.feats[i, :4].astype(np.float32), precision=3, separator=",")
        )


@app.command()
@user_errors
def points(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="A model folder, a key of models in the params file, or models/NAME."
        ),
    ],
    filter: Annotated[
        str,
        typer.Option(
            "--filter", "-f", help="Glob on module paths: * within a segment, ** across, e.g. 'vit.layers.*'."
        ),
    ] = "**",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """List a model's hook points: module paths with their output shape for one image."""
    from blueglass.errors import ModelError
    from blueglass.models import load_adapter, match_points, open_model

    folder = Path(model)
    if folder.is_dir():
        adapter = load_adapter(folder)  # the adapter is chosen by the folder's config.json
    else:
        base = params.resolve().parent if params.exists() else Path.cwd()
        p = _load(params)[0] if params.exists() else None
        if p is not None and model in p.models:
            adapter = open_model(p, base, model)  # models.<name> of the params file (any kind)
        elif (base / "models" / model).is_dir():
            adapter = load_adapter(base / "models" / model)
        else:
            raise ModelError(
                f"{model}: neither a model folder, a key of models in {params}, nor a trained model under {base / 'models'}"
            )
    pts = match_points(adapter.hook_points(), [filter])
    if not pts:
        raise ModelError(f"no hook point matches {filter!r}")
    width = max(len(pt.name) for pt in pts)
    for pt in pts:
        typer.echo(f"{pt.name:<{width}}  {pt.module_type:<28} {tuple(pt.shape)}")


@registry_app.command("list")
@user_errors
def registry_list(
    name: Annotated[str | None, typer.Option("--name", help="Only models whose name contains this.")] = None,
) -> None:
    """Registered models with their versions, aliases and key metrics."""
    from rich.console import Console
    from rich.table import Table

    from blueglass.tracking import list_registry

    rows = list_registry(name)
    if not rows:
        typer.echo("the registry is empty")
        return
    t = Table("model", "version", "aliases", "headline", "headline by split", "review")
    for r in rows:
        # every metric tag stays in the MLflow UI; the table shows the headline per split (val, test, …)
        shown = {k: v for k, v in r.metrics.items() if k.split(".", 1)[-1] == r.headline and "." in k}
        metrics = ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(shown.items()))
        if not metrics and r.value(r.headline) is not None:
            metrics = f"{r.headline} {r.value(r.headline):.3f}"
        review = [
            f"{k} {r.value(k):.3f}"
            for k in ("fvu", "l0", "dead_frac", "recovered")
            if ".sae-" in r.name and r.value(k) is not None
        ]
        t.add_row(r.name, r.version, ",".join(r.aliases), r.headline, metrics, ", ".join(review))
    Console(width=220).print(t)


@registry_app.command("promote")
@user_errors
def registry_promote(
    name: Annotated[str | None, typer.Argument(help="Registered model name.")] = None,
    version: Annotated[str | None, typer.Argument(help="Version number.")] = None,
    alias: Annotated[
        str, typer.Option("--alias", help="Alias to set (champion, challenger, …).")
    ] = "champion",
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            help="Instead of NAME VERSION: make the version with the best value of this tag "
            "(e.g. recovered) champion of every SAE registered model (one per point and variant).",
        ),
    ] = None,
) -> None:
    """Set an alias on a registered model version by hand, or pick SAE champions per point by a metric."""
    from blueglass.errors import BlueGlassError
    from blueglass.tracking import promote, promote_by

    if by is not None:
        if name or version:
            raise BlueGlassError("registry promote: give NAME VERSION or --by, not both")
        chosen = promote_by(by)
        if not chosen:
            typer.echo(f"no SAE version carries '{by}' yet (run the patch stages first)")
        for n, v, val in chosen:
            typer.echo(f"{n} v{v} is now @champion ({by} {val:.3f})")
        return
    if not (name and version):
        raise BlueGlassError("registry promote: give NAME VERSION, or --by <metric>")
    promote(name, version, alias)
    typer.echo(f"{name} v{version} is now @{alias}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
