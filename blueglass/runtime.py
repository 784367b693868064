"""Process-wide settings for a stage: CPU threads, device, seeds, progress bars, atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blueglass.config import RuntimeParams, resolve_threads


def setup(rt: RuntimeParams) -> dict[str, Any]:
    """Set torch's thread count (``runtime.threads``; 0 = min(2, free cores)) and pick the device."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_libraries()
    import torch

    from blueglass.models.base import pick_device

    threads = resolve_threads(rt.threads)
    torch.set_num_threads(threads)
    device = pick_device(rt.device)
    return {"threads": threads, "device": str(device)}


def quiet_libraries() -> None:
    """Silence third-party progress bars (ours are the rich ones) before those libraries load."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # BlueGlass never downloads: fail fast instead of hanging


class _LogLines:
    """Progress for non-terminals (CI logs, ``dvc repro`` piped): one line per task at every 10 %."""

    def __init__(self, console: Any):
        self.console = console
        self.tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        tid = len(self.tasks)
        self.tasks[tid] = {"desc": description, "total": total or 0, "done": 0, "next": 0.1, "info": ""}
        return tid

    def update(
        self, tid: int, *, completed: float | None = None, advance: float = 0, info: str = "", **_: Any
    ):
        t = self.tasks[tid]
        t["done"] = completed if completed is not None else t["done"] + advance
        t["info"] = info or t["info"]
        if t["total"] and t["done"] / t["total"] >= t["next"] - 1e-9:
            pct = int(100 * t["done"] / t["total"])
            self.console.print(f"{t['desc']}: {t['done']:.0f}/{t['total']:.0f} ({pct}%) {t['info']}".rstrip())
            t["next"] = (int(10 * t["done"] / t["total"]) + 1) / 10

    def advance(self, tid: int, amount: float = 1) -> None:
        self.update(tid, advance=amount)


@contextlib.contextmanager
def progress() -> Iterator[Any]:
    """Rich progress bars on stderr; plain 10 % lines when stderr is not a terminal.

    The object yielded has rich's ``add_task(description, total=…, info=…)``, ``update(task, completed=…,
    info=…)`` and ``advance(task, n)``.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        yield _LogLines(console)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    ) as bar:
        yield bar


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing any previous one."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)
