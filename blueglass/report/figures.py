"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

PNGs are written without the "Software" metadata chunk, so the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]  # fmt: skip
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_png(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def probe_curves(
    points: Sequence[str], curves: dict[str, tuple[list[Any], list[Any]]], title: str, path: Path
) -> None:
    """Per-layer probe score: x = point (in Lens order), one colour per target, trained solid and control
    dashed. ``curves``: target → (trained values, control values), None where a point has no value."""
    fig = _figure(9, 4.6)
    ax = fig.add_subplot()
    xs = list(range(len(points)))
    for i, (target, (trained, control)) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        for values, style, label in ((trained, "-", target), (control, "--", f"{target} (control)")):
            pts = [(x, v) for x, v in zip(xs, values, strict=True) if _finite(v)]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=colour, marker="o", markersize=3.5, label=label)
    ax.set_xticks(xs, list(points), rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("hook point (input → output)")
    ax.set_ylabel("probe accuracy / R²")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, ncols=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    save_png(fig, path)


def sae_scatter(rows: Sequence[tuple[str, str, Any, Any]], path: Path) -> None:
    """FVU against L0: one colour per variant (member name), one marker per run; lower-left is better.
    ``rows``: (run, member, l0, fvu)."""
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    members = list(dict.fromkeys(m for _, m, _, _ in rows))
    runs = list(dict.fromkeys(r for r, _, _, _ in rows))
    for run, member, l0, fvu in rows:
        if not (_finite(l0) and _finite(fvu)):
            continue
        ax.scatter(
            [l0],
            [fvu],
            s=60,
            color=PALETTE[members.index(member) % len(PALETTE)],
            marker=MARKERS[runs.index(run) % len(MARKERS)],
            label=f"{run} / {member}",
            edgecolors="black",
            linewidths=0.5,
        )
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("SAE sparsity vs reconstruction (lower-left is better)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    save_png(fig, path)


def recovered_bars(rows: Sequence[tuple[str, Any, Any]], metric: str, title: str, path: Path) -> None:
    """Performance recovered per intervention (horizontal bars), with the baselines: 0 = zero ablation,
    1 = clean model, and a diamond at the mean-ablation baseline on the same scale.
    ``rows``: (intervention, recovered, mean ablation expressed as recovered)."""
    fig = _figure(8, 0.9 + 0.45 * max(len(rows), 1))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    for y, (name, rec, mean_rec) in zip(ys, rows, strict=True):
        if _finite(rec):
            ax.barh(y, rec, color=PALETTE[0] if name != "joint" else PALETTE[4], height=0.6)
            ax.text(rec, y, f" {rec:.2f}", va="center", fontsize=8)
        if _finite(mean_rec):
            ax.plot([mean_rec], [y], "D", color=PALETTE[1], markersize=6, markeredgecolor="black")
    ax.axvline(0, color="#555", lw=1)
    ax.axvline(1, color=PALETTE[2], lw=1.2, ls="--")
    ax.plot([], [], "D", color=PALETTE[1], markeredgecolor="black", label="mean ablation")
    ax.plot([], [], "--", color=PALETTE[2], label="clean model (1)")
    ax.plot([], [], "-", color="#555", label="zero ablation (0)")
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    ax.set_xlabel(f"{metric} recovered = (patched − zero) / (clean − zero)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    save_png(fig, path)
