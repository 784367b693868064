"""The static HTML report: ``reports/index.html`` plus PNG figures under ``reports/figures/``.

``build_report(base)`` reads what the pipeline's stages left in ``metrics/``, ``plots/`` and
``reports/latents/`` (each section only when its inputs exist), draws the figures with matplotlib and
writes one self-contained page (inline CSS, no JavaScript, relative image paths) that opens offline.
``browser.screenshot`` renders it in headless Chromium. See docs/report.md.
"""

from blueglass.report.build import build_report

__all__ = ["build_report"]
