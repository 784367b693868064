"""Render a report page in headless Chromium (a real browser's view of it, for tests and ``--screenshot``).

The browser is ``BLUEGLASS_BROWSER`` if set, else the first of :data:`CANDIDATES` on ``PATH``. On Debian,
``apt-get install --no-install-recommends chromium-headless-shell`` provides ``chromium-headless-shell``
(``make test`` installs it when it can; see docs/report.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from blueglass.errors import BlueGlassError

CANDIDATES = (
    "chromium-headless-shell",
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
)


def find_browser() -> str | None:
    """Path of a headless-capable Chromium, or None."""
    env = os.environ.get("BLUEGLASS_BROWSER")
    if env:
        return shutil.which(env)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2400, timeout: float = 60) -> Path:
    """Render ``html`` (a local file) at ``width`` × ``height`` CSS pixels into ``png``; return ``png``."""
    browser = find_browser()
    if browser is None:
        raise BlueGlassError(
            "no headless Chromium found (tried " + ", ".join(CANDIDATES) + "; or set BLUEGLASS_BROWSER): "
            "apt-get install --no-install-recommends chromium-headless-shell"
        )
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise BlueGlassError(f"{html}: no such report page")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="blueglass-chromium-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",  # root in containers and CI; the page is our own local file
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--mute-audio",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            html.as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BlueGlassError(f"{browser} did not finish the screenshot within {timeout:.0f} s") from None
    if proc.returncode != 0 or not png.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BlueGlassError(f"{browser} failed to render {html.name} (exit {proc.returncode}): {tail[0]}")
    return png
