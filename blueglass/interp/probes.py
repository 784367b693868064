"""Linear probes on Lens points: "where in the network does the model know X?".

A probe target names a metadata column and the rows it applies to:

* ground truth / concepts — ``color``, ``shape``, ``size`` (toy world; patch tokens covering an object, or
  CLS tokens of single-object images), ``cover_class`` (patch tokens), ``gt_class`` (kept detections);
* approximation of the model itself — ``pred_class`` and ``tp`` (kept detections), ``pred_box``
  (regression of the kept detection's box, normalised by image size).

Rows are split into train / test by image (``image_id`` hash), never by token, so neighbouring tokens of
one image cannot leak across the split. Classification probes are multinomial logistic regression
(standardised features, L2, full-batch L-BFGS); regression probes are ridge regression in closed form.
Metrics: ``accuracy``, ``balanced_accuracy``, ``auroc`` (macro one-vs-rest), ``chance`` (majority-class
accuracy on the test rows); ``r2`` for regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from blueglass.features.align import CLS, PATCH
from blueglass.interp.ranks import auroc_from_ranks, average_ranks


@dataclass(frozen=True)
class ProbeTarget:
    name: str
    column: str
    kind: Literal["classification", "regression"] = "classification"
    token_kinds: tuple[int, ...] = (PATCH, CLS)
    kept_only: bool = False  # only tokens whose detection survived post-processing


def default_targets(meta_fields: Sequence[str]) -> list[ProbeTarget]:
    """The targets a Lens supports, from its metadata columns."""
    out = [ProbeTarget(c, c) for c in ("color", "shape", "size") if c in meta_fields]
    out.append(ProbeTarget("cover_class", "cover_class", token_kinds=(PATCH,)))
    out += [
        ProbeTarget("gt_class", "gt_class", kept_only=True),
        ProbeTarget("pred_class", "pred_class", kept_only=True),
        ProbeTarget("tp", "tp", kept_only=True),
        ProbeTarget("pred_box", "pred_box", kind="regression", kept_only=True),
    ]
    return out


def select_rows(meta: np.ndarray, target: ProbeTarget) -> np.ndarray:
    keep = np.isin(meta["token_kind"], target.token_kinds)
    if target.kept_only:
        keep &= meta["kept"] == 1
    if target.kind == "classification" and target.column not in ("tp",):
        keep &= meta[target.column] >= 0
    return keep


def image_split(image_ids: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean test mask, the same for every token of an image (a seeded hash of the image id)."""
    h = (image_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)) >> np.uint64(40)
    return (h % np.uint64(1000)) < int(test_fraction * 1000)


def auroc_ovr(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
    """Macro one-vs-rest AUROC from rank statistics (ties get average ranks); NaN without both sides."""
    aucs = []
    for j, c in enumerate(classes):
        pos = labels == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        aucs.append(float(auroc_from_ranks(average_ranks(scores[:, j]), pos)))
    return float(np.mean(aucs)) if aucs else float("nan")


@dataclass
class ProbeResult:
    target: str
    kind: str
    metrics: dict[str, float]
    weight: np.ndarray  # [classes or outputs, d] in raw activation space
    bias: np.ndarray
    classes: list[int] = field(default_factory=list)
    n_train: int = 0
    n_test: int = 0

    def save(self, folder, **extra: Any):
        """``probe.json`` (target, kind, classes, metrics, lineage) + ``probe.safetensors`` (weight, bias)."""
        import json
        from pathlib import Path

        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "target": self.target,
            "kind": self.kind,
            "classes": self.classes,
            "metrics": self.metrics,
            "n_train": self.n_train,
            "n_test": self.n_test,
            **extra,
        }
        (folder / "probe.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(
            {
                "weight": np.ascontiguousarray(self.weight, np.float32),
                "bias": np.ascontiguousarray(self.bias, np.float32),
            },
            str(folder / "probe.safetensors"),
        )
        return folder

    @classmethod
    def load(cls, folder) -> ProbeResult:
        import json
        from pathlib import Path

        from safetensors.numpy import load_file

        cfg = json.loads((Path(folder) / "probe.json").read_text())
        t = load_file(str(Path(folder) / "probe.safetensors"))
        return cls(
            cfg["target"],
            cfg["kind"],
            cfg["metrics"],
            t["weight"],
            t["bias"],
            cfg["classes"],
            cfg["n_train"],
            cfg["n_test"],
        )

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """Scores ``[rows, classes]`` (classification) or predictions ``[rows, outputs]`` (regression)."""
        return feats.astype(np.float32) @ self.weight.T + self.bias

    def direction(self, cls: int | None = None) -> np.ndarray:
        """A unit steering direction: the weight row of ``cls`` (or the first/only row)."""
        row = self.weight[self.classes.index(cls)] if cls is not None else self.weight[0]
        return row / max(np.linalg.norm(row), 1e-12)


def fit_probe(
    feats: np.ndarray,
    meta: np.ndarray,
    target: ProbeTarget,
    *,
    l2: float = 1e-3,
    seed: int = 0,
    max_iter: int = 200,
) -> ProbeResult | None:
    """Train and score one probe; ``None`` when the Lens has too few rows or classes for it."""
    rows = select_rows(meta, target)
    x = feats[rows].astype(np.float32)
    m = meta[rows]
    if target.kind == "regression":
        y = m[target.column].reshape(len(m), -1).astype(np.float32)
        if target.column == "pred_box":
            y = y / np.float32(max(float(np.abs(y).max()), 1.0))
    else:
        y = m[target.column].astype(np.int64)
    test = image_split(m["image_id"], seed=seed)
    if test.sum() < 5 or (~test).sum() < 10:
        return None
    mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
    xs = (x - mu) / sd
    if target.kind == "regression":
        a = np.concatenate([xs[~test], np.ones(((~test).sum(), 1), np.float32)], 1)
        w = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1], dtype=np.float32), a.T @ y[~test])
        pred = np.concatenate([xs[test], np.ones((test.sum(), 1), np.float32)], 1) @ w
        ss_res = ((pred - y[test]) ** 2).sum()
        ss_tot = ((y[test] - y[test].mean(0)) ** 2).sum()
        metrics = {"r2": float(1 - ss_res / max(ss_tot, 1e-12))}
        weight, bias = (w[:-1] / sd[:, None]).T, w[-1] - (mu / sd) @ w[:-1]
        return ProbeResult(
            target.name, "regression", metrics, weight, bias, [], int((~test).sum()), int(test.sum())
        )

    classes = np.unique(y[~test])
    if len(classes) < 2:
        return None
    index = {int(c): i for i, c in enumerate(classes)}
    y_idx = np.array([index.get(int(v), -1) for v in y])
    torch.manual_seed(seed)
    xt = torch.from_numpy(xs[~test])
    yt = torch.from_numpy(y_idx[~test])
    lin = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        scores = lin(torch.from_numpy(xs[test])).softmax(-1).numpy()
    y_test = y[test]
    pred = classes[scores.argmax(1)]
    seen = np.isin(y_test, classes)
    per_class = [float((pred[y_test == c] == c).mean()) for c in classes if (y_test == c).any()]
    majority = float(np.max(np.unique(y_test, return_counts=True)[1]) / len(y_test))
    metrics = {
        "accuracy": float((pred == y_test).mean()),
        "balanced_accuracy": float(np.mean(per_class)) if per_class else float("nan"),
        "auroc": auroc_ovr(scores[seen], y_test[seen], classes),
        "chance": majority,
    }
    w = lin.weight.detach().numpy() / sd[None, :]
    b = lin.bias.detach().numpy() - w @ mu
    return ProbeResult(
        target.name,
        "classification",
        metrics,
        w,
        b,
        [int(c) for c in classes],
        int((~test).sum()),
        int(test.sum()),
    )


def probe_point(
    feats: np.ndarray, meta: np.ndarray, targets: Sequence[ProbeTarget], **kw: Any
) -> dict[str, ProbeResult]:
    """Every target that the point's rows support."""
    out = {}
    for t in targets:
        if t.column not in meta.dtype.names:
            continue
        res = fit_probe(feats, meta, t, **kw)
        if res is not None:
            out[t.name] = res
    return out
