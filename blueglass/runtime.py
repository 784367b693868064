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


@contextlib.contextmanager
def progress() -> Iterator[Any]:
    """A rich progress display on stderr (plain lines when stderr is not a terminal)."""
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
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not console.is_terminal and os.environ.get("BLUEGLASS_PROGRESS", "") != "1",
    ) as bar:
        yield bar
        if not console.is_terminal:
            for task in bar.tasks:
                console.print(
                    f"{task.description}: {task.completed:.0f}/{task.total or 0:.0f} {task.fields.get('info', '')}"
                )


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
