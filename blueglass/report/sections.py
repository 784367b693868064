"""The six sections of ``reports/index.html``. Each reads its inputs from the project folder, draws its
figures into the build's figure folder and returns a :class:`Section`; a section whose inputs do not
exist says "Not run yet" and an unreadable input becomes an error note — never an exception.

Inputs (all optional):
  benchmark  metrics/benchmark.json
  probes     plots/probe_<run>.csv (per-layer curve) and metrics/probe_<run>.json (per point × target)
  saes       metrics/sae_<run>.json ({member: metrics} or, from older runs, one flat metrics dict)
  patching   metrics/patch_<run>.json
  latents    reports/latents/<run>/<member>/latents.json with its PNGs next to it
  lineage    git, metrics/extract_<lens>.json (Lens md5), the MLflow registry
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from blueglass.report import figures
from blueglass.report.html import Raw, Section, fmt, img, not_run, note, pct, table

DETECTION_COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]


@dataclass
class Context:
    """What a section builder needs: the project folder, where figures go, and params (or None)."""

    base: Path
    figure_dir: Path  # written during the build; becomes reports/figures/
    params: Any = None
    figures: list[str] = field(default_factory=list)

    @property
    def reports(self) -> Path:
        return self.base / "reports"

    def figure(self, name: str) -> tuple[Path, str]:
        """(file to write, ``src`` relative to reports/index.html) of a new figure."""
        fname = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"
        self.figures.append(fname)
        return self.figure_dir / fname, f"figures/{fname}"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.base).as_posix()


def read_json(ctx: Context, path: Path) -> tuple[Any, str]:
    """(data, "") or (None, a one-line error note's HTML) for an unreadable file."""
    try:
        return json.loads(path.read_text()), ""
    except (OSError, ValueError) as exc:
        return None, note(f"Could not read {ctx.rel(path)}: {exc}", "error")


def runs_of(folder: Path, prefix: str, suffix: str) -> list[str]:
    """Run names of files ``<folder>/<prefix><run><suffix>``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name[len(prefix) : -len(suffix)] for p in folder.glob(f"{prefix}*{suffix}"))


def metric_files(ctx: Context, stage: str) -> list[tuple[str, Any, str]]:
    """(run, data, error note) of every ``metrics/<stage>_<run>.json``, sorted by run."""
    metrics = ctx.base / "metrics"
    return [
        (run, *read_json(ctx, metrics / f"{stage}_{run}.json"))
        for run in runs_of(metrics, f"{stage}_", ".json")
    ]


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _params_run(ctx: Context, section: str, run: str) -> Any:
    sec = getattr(ctx.params, section, None) if ctx.params is not None else None
    return sec.runs.get(run) if sec is not None else None


def _run_heading(ctx: Context, section: str, run: str) -> str:
    spec = _params_run(ctx, section, run)
    if spec is None:
        extra = (
            ' <span class="muted">(not in params.yaml: output of an earlier configuration)</span>'
            if ctx.params is not None
            else ""
        )
    else:
        bits = [f"Lens <code>{spec.lens}</code>"]
        if getattr(spec, "point", None):
            bits.append(f"point <code>{spec.point}</code>")
        if getattr(spec, "control", None):
            bits.append(f"control Lens <code>{spec.control}</code>")
        extra = ' <span class="muted">— ' + ", ".join(bits) + "</span>"
    return f"<h3>{fmt(run)}{extra}</h3>"


# ---------------------------------------------------------------- 1. benchmark
def benchmark(ctx: Context) -> Section:
    title = "Benchmark"
    path = ctx.base / "metrics" / "benchmark.json"
    if not path.exists():
        return Section("benchmark", title, not_run("the benchmark stage", "metrics/benchmark.json"), False)
    data, err = read_json(ctx, path)
    if err or not isinstance(data, dict):
        return Section("benchmark", title, err or note(f"{ctx.rel(path)}: not a JSON object", "error"), False)
    results = {k: v for k, v in data.items() if isinstance(v, dict)}
    det = {k: v for k, v in results.items() if v.get("task") == "detection"}
    zs = {k: v for k, v in results.items() if v.get("task") == "zero_shot"}
    other = {k: v for k, v in results.items() if k not in det and k not in zs}
    parts = [f"<p>Task performance on the test splits, from <code>{ctx.rel(path)}</code>.</p>"]
    if det:
        parts.append("<h3>Detection (COCO box metrics)</h3>")
        parts.append(
            table(
                ["model@split", "images", *DETECTION_COLUMNS],
                [[k, m.get("images"), *(m.get(c) for c in DETECTION_COLUMNS)] for k, m in det.items()],
            )
        )
        classes = list(dict.fromkeys(c for m in det.values() for c in (m.get("per_class") or {})))
        if classes:
            parts.append("<p>AP per class:</p>")
            parts.append(
                table(
                    ["model@split", *classes],
                    [[k, *((m.get("per_class") or {}).get(c) for c in classes)] for k, m in det.items()],
                )
            )
    if zs:
        fams = list(
            dict.fromkeys(
                f for m in zs.values() for f, v in m.items() if isinstance(v, dict) and "accuracy" in v
            )
        )
        parts.append("<h3>Zero-shot classification (accuracy per prompt family)</h3>")
        header = ["model@split", "images", "mean"] + fams
        rows = [
            [k, m.get("images"), m.get("accuracy")]
            + [Raw(_family_cell(m.get(f))) if isinstance(m.get(f), dict) else None for f in fams]
            for k, m in zs.items()
        ]
        parts.append(table(header, rows))
    if other:
        keys = list(
            dict.fromkeys(k for m in other.values() for k, v in m.items() if _num(v) and k != "images")
        )
        parts.append("<h3>Other tasks</h3>")
        parts.append(
            table(
                ["model@split", "task", "images", *keys],
                [[k, m.get("task"), m.get("images"), *(m.get(c) for c in keys)] for k, m in other.items()],
                left=2,
            )
        )
    if not results:
        parts.append(note("The benchmark file holds no results.", "missing"))
    return Section("benchmark", title, "\n".join(parts), bool(results))


def _family_cell(v: dict[str, Any]) -> str:
    classes = v.get("classes")
    return fmt(v.get("accuracy")) + (f' <span class="muted">/{classes}</span>' if classes else "")


# ---------------------------------------------------------------- 2. probes
def _read_curve(path: Path) -> tuple[list[str], dict[str, tuple[list[Any], list[Any]]]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: float(r.get("depth") or 0))
    points = [r.get("point", "") for r in rows]
    cols = list(rows[0]) if rows else []
    targets = [c for c in cols if c not in ("depth", "point") and not c.endswith("_control")]

    def val(r: dict[str, str], c: str) -> float | None:
        try:
            return float(r[c]) if r.get(c) not in (None, "") else None
        except ValueError:
            return None

    return points, {t: ([val(r, t) for r in rows], [val(r, f"{t}_control") for r in rows]) for t in targets}


def probes(ctx: Context) -> Section:
    title = "Probes per layer"
    plots, metrics = ctx.base / "plots", ctx.base / "metrics"
    runs = sorted(set(runs_of(plots, "probe_", ".csv")) | set(runs_of(metrics, "probe_", ".json")))
    if not runs:
        return Section(
            "probes",
            title,
            not_run("the probe stage", "plots/probe_<run>.csv or metrics/probe_<run>.json"),
            False,
        )
    parts = [
        "<p>Linear probes trained on every hook point of a Lens; the dashed line is the same probe on the "
        "random-init control Lens. A concept counts as <b>learned</b> at a point when the trained model's "
        "probe beats the control's by <code>probe.learned_margin</code>.</p>"
    ]
    for run in runs:
        parts.append(_run_heading(ctx, "probe", run))
        curve, js = plots / f"probe_{run}.csv", metrics / f"probe_{run}.json"
        order: list[str] = []
        if curve.exists():
            try:
                order, curves = _read_curve(curve)
            except (OSError, csv.Error, UnicodeDecodeError) as exc:
                parts.append(note(f"Could not read {ctx.rel(curve)}: {exc}", "error"))
            else:
                if curves:
                    file, src = ctx.figure(f"probe_{run}")
                    figures.probe_curves(
                        order, curves, f"probe {run}: trained (solid) vs control (dashed)", file
                    )
                    parts.append(img(src, f"per-layer probe curves of {run}", cls="plot"))
                else:
                    parts.append(note(f"{ctx.rel(curve)} has no target columns.", "missing"))
        else:
            parts.append(not_run("the per-layer curve", ctx.rel(curve)))
        if js.exists():
            data, err = read_json(ctx, js)
            parts.append(err or _probe_tables(data, order))
        else:
            parts.append(not_run("the per-point metrics", ctx.rel(js)))
    return Section("probes", title, "\n".join(parts), True)


def _probe_tables(data: Any, order: list[str]) -> str:
    if not isinstance(data, dict) or not data:
        return note("The probe metrics hold no points.", "missing")
    points = [p for p in order if p in data] + [p for p in data if p not in order]
    targets = list(dict.fromkeys(t for p in points for t in (data[p] or {})))
    rows, classes = [], []
    learned_at: dict[str, list[str]] = {t: [] for t in targets}
    for p in points:
        row, cls = [p], [""]
        for t in targets:
            m = data[p].get(t) if isinstance(data[p], dict) else None
            if not isinstance(m, dict):
                row.append(None)
                cls.append("")
                continue
            h = "r2" if "r2" in m else "accuracy"
            ctrl = m.get(f"control_{h}")
            learned = m.get("learned")
            cell = fmt(m.get(h)) + (
                f'<br><span class="muted">ctrl {fmt(ctrl)}</span>' if ctrl is not None else ""
            )
            if learned is not None:
                cell += " ✓" if learned else ""
            row.append(Raw(cell))
            cls.append("learned" if learned else "notlearned" if learned is False else "")
            if learned:
                learned_at[t].append(p)
        rows.append(row)
        classes.append(cls)
    header = ["point"] + [f"{t} ({'R²' if _is_regression(data, t) else 'acc'})" for t in targets]
    summary = table(
        ["concept", "learned at"],
        [[t, ", ".join(ps) if ps else "nowhere (or no control)"] for t, ps in learned_at.items()],
        left=2,
    )
    return (
        "<p>Test score per point and target (accuracy, or R² for boxes), the control's below; "
        "green ✓ = learned.</p>" + table(header, rows, classes=classes) + "<p>Learned concepts:</p>" + summary
    )


def _is_regression(data: dict[str, Any], target: str) -> bool:
    return any(isinstance(v, dict) and "r2" in (v.get(target) or {}) for v in data.values())


# ---------------------------------------------------------------- 3. SAEs
def sae_members(ctx: Context, run: str, data: Any) -> dict[str, dict[str, Any]]:
    """``{member: metrics}``; a flat metrics dict (one SAE, older runs) becomes one member named after
    its variant in params (else "sae")."""
    if not isinstance(data, dict):
        return {}
    if "fvu" in data and not isinstance(data["fvu"], dict):
        spec = _params_run(ctx, "sae", run)
        return {getattr(spec, "variant", None) or "sae": data}
    return {m: v for m, v in data.items() if isinstance(v, dict)}


def saes(ctx: Context) -> Section:
    title = "Sparse autoencoders"
    files = metric_files(ctx, "sae")
    if not files:
        return Section("saes", title, not_run("the SAE stage", "metrics/sae_<run>.json"), False)
    parts, rows, errors = [], [], []
    for run, data, err in files:
        if err:
            errors.append(err)
            continue
        for member, m in sae_members(ctx, run, data).items():
            rows.append((run, member, m))
    if rows:
        file, src = ctx.figure("sae_fvu_l0")
        figures.sae_scatter([(r, mb, m.get("l0"), m.get("fvu")) for r, mb, m in rows], file)
        parts.append(
            "<p>Each SAE (run / sweep member) on the held-out shard: sparsity (L0) against reconstruction "
            "error (FVU). Concept recovery = mean over a concept's values of the best single latent's AUROC.</p>"
        )
        parts.append(img(src, "SAE FVU against L0", cls="plot"))
        concepts = list(dict.fromkeys(c for _, _, m in rows for c in (m.get("concept_recovery") or {})))
        parts.append(
            table(
                ["run", "member", "L0", "FVU", "expl. var.", "MSE", "dead", "dense", "steps"]
                + [f"recovery: {c}" for c in concepts],
                [
                    [
                        r,
                        mb,
                        m.get("l0"),
                        m.get("fvu"),
                        m.get("explained_variance"),
                        m.get("mse"),
                        Raw(pct(m.get("dead_frac"))),
                        Raw(pct(m.get("dense_frac"))),
                        m.get("steps"),
                    ]
                    + [(m.get("concept_recovery") or {}).get(c) for c in concepts]
                    for r, mb, m in rows
                ],
                left=2,
            )
        )
    return Section("saes", title, "\n".join(parts + errors), bool(rows))


# ---------------------------------------------------------------- 4. patching
INTERVENTION_FIELDS = [
    "metric_clean",
    "metric_patched",
    "metric_zero_ablation",
    "metric_mean_ablation",
    "recovered",
    "recovered_vs_mean",
]


def _mean_as_recovered(v: dict[str, Any]) -> float | None:
    clean, zero, mean = (v.get(k) for k in ("metric_clean", "metric_zero_ablation", "metric_mean_ablation"))
    if not all(_num(x) for x in (clean, zero, mean)) or math.isclose(clean, zero):
        return None
    return (mean - zero) / (clean - zero)


def patching(ctx: Context) -> Section:
    title = "Patched performance"
    files = metric_files(ctx, "patch")
    if not files:
        return Section("patching", title, not_run("the patch stage", "metrics/patch_<run>.json"), False)
    parts = [
        "<p>The Feature Patcher splices an intervention into the running model and re-runs the benchmark. "
        "<b>recovered</b> = (patched − zero ablation) / (clean − zero ablation): 1 = as good as the clean "
        "model, 0 = as bad as zeroing the site; <b>vs mean abl.</b> is the same with the mean ablation as "
        "the floor.</p>"
    ]
    for run, data, err in files:
        parts.append(f"<h3>{fmt(run)}</h3>")
        if err or not isinstance(data, dict):
            parts.append(err or note(f"metrics/patch_{run}.json: not a JSON object", "error"))
            continue
        metric = str(data.get("metric") or "metric")
        parts.append(
            f"<p>Model <code>{fmt(data.get('model'))}</code> on split <code>{fmt(data.get('split'))}</code>; "
            f"metric <b>{fmt(metric)}</b>.</p>"
        )
        items = [(n, v) for n, v in (data.get("interventions") or {}).items() if isinstance(v, dict)]
        if isinstance(data.get("joint"), dict):
            items.append(("joint", data["joint"]))
        if items:
            rows = []
            for name, v in items:
                reg = v.get("registry") or {}
                uses = v.get("uses") or {}
                rows.append(
                    [
                        name,
                        v.get("kind"),
                        ", ".join(map(str, v.get("sites") or [])),
                        *(v.get(k) for k in INTERVENTION_FIELDS),
                        f"{reg['name']} v{reg.get('version', '?')}"
                        + (f" @{reg['alias']}" if reg.get("alias") else "")
                        if reg.get("name")
                        else None,
                        ", ".join(f"{k}: {u}" for k, u in uses.items()) or None,
                    ]
                )
            parts.append(
                table(
                    [
                        "intervention",
                        "kind",
                        "sites",
                        "clean",
                        "patched",
                        "zero abl.",
                        "mean abl.",
                        "recovered",
                        "vs mean abl.",
                    ]
                    + ["registered", "uses"],
                    rows,
                    left=3,
                )
            )
            file, src = ctx.figure(f"patch_{run}")
            figures.recovered_bars(
                [(n, v.get("recovered"), _mean_as_recovered(v)) for n, v in items],
                metric,
                f"patch {run}: {metric} recovered",
                file,
            )
            parts.append(img(src, f"performance recovered per intervention of {run}", cls="plot"))
        else:
            parts.append(note("No interventions in this run.", "missing"))
        sites = {s: v for s, v in (data.get("sites") or {}).items() if isinstance(v, dict)}
        if sites:
            clean = (data.get("clean") or {}).get(metric)
            parts.append(f"<p>Ablation baselines per site ({fmt(metric)}):</p>")
            parts.append(
                table(
                    ["site", "clean", "zero ablation", "mean ablation"],
                    [
                        [
                            s,
                            clean,
                            (v.get("zero_ablation") or {}).get(metric),
                            (v.get("mean_ablation") or {}).get(metric),
                        ]
                        for s, v in sites.items()
                    ],
                )
            )
    return Section("patching", title, "\n".join(parts), True)


# ---------------------------------------------------------------- 5. latents
def _asset(folder: Path, name: Any) -> Path | None:
    """``folder/name`` when ``name`` is a plain relative path that stays inside ``folder`` and exists."""
    if not isinstance(name, str) or not name:
        return None
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        return None
    path = folder / p
    return path if path.is_file() else None


def latents(ctx: Context) -> Section:
    title = "SAE latents"
    root = ctx.reports / "latents"
    files = sorted(root.glob("*/*/latents.json")) if root.is_dir() else []
    if not files:
        return Section(
            "latents",
            title,
            not_run("the SAE latent grids", "reports/latents/<run>/<member>/latents.json"),
            False,
        )
    parts = [
        "<p>The most active images of each SAE's top latents (from the SAE stage), labelled with the concept "
        "value the latent separates best (AUROC), and the latent × class heatmap.</p>"
    ]
    for path in files:
        folder = path.parent
        data, err = read_json(ctx, path)
        name = f"{folder.parent.name}/{folder.name}"
        if err or not isinstance(data, dict):
            parts.append(
                f"<h3>{fmt(name)}</h3>" + (err or note(f"{ctx.rel(path)}: not a JSON object", "error"))
            )
            continue
        parts.append(
            f"<h3>{fmt(data.get('sae') or name)}"
            + (
                f' <span class="muted">at <code>{fmt(data["point"])}</code></span>'
                if data.get("point")
                else ""
            )
            + "</h3>"
        )
        figs, missing = [], []
        for lat in data.get("top_latents") or []:
            if not isinstance(lat, dict):
                continue
            asset = _asset(folder, lat.get("grid"))
            label = f"latent {lat.get('latent')}"
            if asset is None:
                missing.append(f"{label} ({lat.get('grid')})")
                continue
            cap = f"{label} · max act. {fmt(lat.get('max_activation'), 2)}"
            if lat.get("concept"):
                cap += f" · {lat['concept']} (AUROC {fmt(lat.get('concept_auroc'), 2)})"
            figs.append(img(asset.relative_to(ctx.reports).as_posix(), label, cap))
        if figs:
            parts.append('<div class="grid">' + "".join(figs) + "</div>")
        elif not missing:
            parts.append(note("No top latents listed.", "missing"))
        heat = data.get("class_heatmap")
        if heat:
            asset = _asset(folder, heat)
            if asset is None:
                missing.append(f"class heatmap ({heat})")
            else:
                parts.append(
                    img(
                        asset.relative_to(ctx.reports).as_posix(),
                        "latent × class heatmap",
                        "latent × class heatmap",
                        "plot",
                    )
                )
        if missing:
            parts.append(
                note(
                    f"Missing or invalid image(s) in {ctx.rel(path)}: " + "; ".join(map(str, missing)),
                    "error",
                )
            )
    return Section("latents", title, "\n".join(parts), True)


# ---------------------------------------------------------------- 6. lineage
def lineage(ctx: Context) -> Section:
    from blueglass import tracking

    title = "Lineage"
    sha, dirty = tracking.git_state()
    parts = [
        "<p>Git commit <code>"
        + fmt(sha)
        + "</code>"
        + (" <b>with uncommitted changes</b>" if dirty else " (clean working tree)")
        + ".</p>"
    ]
    parts.append("<h3>Lens datasets</h3>")
    lens_rows = []
    for name, data, err in metric_files(ctx, "extract"):
        if err:
            parts.append(err)
            continue
        if isinstance(data, dict):
            size = data.get("bytes")
            lens_rows.append(
                [
                    data.get("lens") or name,
                    Raw(f"<code>{fmt(data.get('md5'))}</code>"),
                    data.get("points"),
                    data.get("images"),
                    data.get("rows"),
                    Raw(f"{size / 1e6:.1f} MB" if _num(size) else "—"),
                ]
            )
    parts.append(
        table(["Lens", "md5", "points", "images", "rows", "size"], lens_rows)
        if lens_rows
        else not_run("the extract stage", "metrics/extract_<lens>.json")
    )
    parts.append("<h3>Model registry</h3>")
    parts.append(_registry(tracking))
    return Section("lineage", title, "\n".join(parts), True)


def _registry(tracking: Any) -> str:
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.exists():
            return note(f"No MLflow database at {db}: nothing has been tracked or registered yet.", "missing")
    else:  # a tracking server: fail fast instead of retrying for minutes when it is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        rows = tracking.list_registry()
    except Exception as exc:  # the report must not die on a broken or unreachable registry
        return note(
            f"Could not read the MLflow registry at {uri}: {type(exc).__name__}: {exc}".splitlines()[0],
            "error",
        )
    if not rows:
        return note("The MLflow registry is empty.", "missing")
    out = []
    for r in rows:
        shown = {k: v for k, v in r.metrics.items() if k == r.headline or k.endswith(f".{r.headline}")}
        created = (
            datetime.fromtimestamp(r.created / 1000, UTC).strftime("%Y-%m-%d %H:%M") if r.created else None
        )
        out.append(
            [
                r.name,
                r.version,
                ", ".join(r.aliases) or None,
                r.headline or None,
                ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(shown.items())) or None,
                created,
            ]
        )
    return f"<p>From <code>{fmt(uri)}</code>.</p>" + table(
        ["registered model", "version", "aliases", "headline", "headline values", "created (UTC)"],
        out,
        left=1,
    )


SECTIONS = [benchmark, probes, saes, patching, latents, lineage]
