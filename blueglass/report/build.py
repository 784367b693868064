"""Assemble ``reports/index.html`` from the sections (see :mod:`blueglass.report.sections`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from blueglass.report import sections
from blueglass.report.html import page
from blueglass.runtime import replace_dir, write_text


def build_report(base: Path, params: Any = None) -> dict[str, Any]:
    """Write ``<base>/reports/index.html`` and ``<base>/reports/figures/*.png``.

    ``params`` (optional) names each probe / SAE run's Lens and point and marks outputs of runs no longer
    configured. Figures are drawn into a temporary folder that replaces ``reports/figures/`` when all are
    done; the page is written last (atomically). Returns ``{"index", "figures", "sections"}`` where
    ``sections`` maps each section id to whether its inputs existed.
    """
    from blueglass import tracking

    base = Path(base).resolve()
    reports = base / "reports"
    tmp = reports / ".figures.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ctx = sections.Context(base=base, figure_dir=tmp, params=params)
    try:
        built = [build(ctx) for build in sections.SECTIONS]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, reports / "figures")
    sha, dirty = tracking.git_state()
    subtitle = f"Project {base.name} · git {sha[:12]}{' (dirty)' if dirty else ''} · blueglass {_version()}"
    index = reports / "index.html"
    write_text(index, page("BlueGlass report", subtitle, built))
    return {"index": index, "figures": sorted(ctx.figures), "sections": {s.id: s.present for s in built}}


def _version() -> str:
    import blueglass

    return blueglass.__version__
