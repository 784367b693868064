"""``report``: the static HTML report of whatever the pipeline has produced so far.

Reads ``metrics/benchmark.json``, ``plots/probe_<run>.csv`` + ``metrics/probe_<run>.json``,
``metrics/sae_<run>.json``, ``metrics/patch_<run>.json``, ``reports/latents/<run>/<member>/latents.json``,
``metrics/extract_<lens>.json``, git and the MLflow registry; writes ``reports/index.html`` and
``reports/figures/*.png``. A section whose inputs are missing says "Not run yet" instead of failing, so the
report can be built at any point of the pipeline. No MLflow run is logged (the report only reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blueglass.config import Params


def run(params: Params | None, base: Path, screenshot: Path | None = None) -> dict[str, Any]:
    """Build the report under ``base``; with ``screenshot``, also render it in headless Chromium."""
    from blueglass.report import build_report

    out = build_report(base, params)
    if screenshot is not None:
        from blueglass.report.browser import screenshot as shoot

        out["screenshot"] = shoot(out["index"], screenshot)
    return out
