"""Linear probes on Lens points: "where in the network does the model know X?".

A probe target names a metadata column and the rows it applies to:

* ground truth / concepts — ``color``, ``shape``, ``size`` (toy world; patch tokens covering an object, or
  CLS tokens of single-object images), ``cover_class`` (patch tokens), ``gt_class`` (kept detections);
* approximation of the model itself — ``pred_class`` and ``tp`` (kept detections), ``pred_box``
  (regression of the kept detection's box, normalised by image size).

Rows are split into train / test by image (``image_id`` hash), never by token, so neighbouring tokens of
one image cannot leak across the split. :func:`train_probes` trains every target of one point at once — a
LightningModule with one linear head per target, fed by the Lens streaming loader, so a Lens larger than
memory is fine and DDP / precision come from Lightning: classification heads are multinomial logistic
regression, regression heads least squares, both on standardised features with an L2 penalty, Adam with
warm-up and decay. Three streamed passes: training-row statistics (feature mean / std, classes, box scale),
training, and test-row scores. Metrics: ``accuracy``, ``balanced_accuracy``, ``auroc`` (macro
one-vs-rest), ``chance`` (majority-class accuracy on the test rows); ``r2`` for regression. Weights are
saved in raw activation space.
"""

from __future__ import annotations

import math
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


@dataclass
class ProbeSettings:
    epochs: int = 15
    min_steps: int = 100  # small Lenses: at least this many steps, whatever the epochs
    batch_size: int = 4096
    lr: float = 0.05
    l2: float = 1e-3
    seed: int = 0
    test_fraction: float = 0.2
    precision: str = "32-true"
    devices: int = 1
    run_id: str | None = None  # MLflow run for the training curves
    log_prefix: str = "train"


@dataclass
class _Head:
    target: ProbeTarget
    classes: np.ndarray  # classification: sorted class values seen in training rows
    lookup: np.ndarray  # class value → head index (−100 = not a training class)
    scale: float = 1.0  # regression: targets divided by this (pred_box: the largest |value|)
    outputs: int = 1  # regression: values per row

    @property
    def width(self) -> int:
        return len(self.classes) if self.target.kind == "classification" else self.outputs

    def labels(self, meta: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Per-row label (class index, −100 where the row is not used) or regression target."""
        col = meta[self.target.column]
        if self.target.kind == "regression":
            return col.reshape(len(meta), -1).astype(np.float32) / np.float32(self.scale)
        vals = np.clip(col.astype(np.int64), 0, len(self.lookup) - 1)
        known = rows & (col >= 0) & (col < len(self.lookup))
        return np.where(known, self.lookup[vals], -100)


def _stats(lens, point: str, targets: Sequence[ProbeTarget], s: ProbeSettings):
    """Pass 1 over the point: mean / std of training-row features, training classes, regression scales."""
    from blueglass.features.lens import TokenLoader

    loader = TokenLoader(lens, point, batch_size=1 << 16, shuffle=False, rank=0, world_size=1)
    n, total, total_sq = 0, None, None
    seen: dict[str, set[int]] = {t.name: set() for t in targets}
    counts = {t.name: [0, 0] for t in targets}  # train, test rows
    scale = {t.name: 1.0 for t in targets}
    lens_fields: dict[str, tuple[int, ...]] = {}
    for batch in loader:
        meta = _meta(batch)
        lens_fields = {c: meta.dtype[c].shape for c in meta.dtype.names}
        test = image_split(meta["image_id"], s.test_fraction, s.seed)
        f = batch["feats"].double()[torch.from_numpy(~test)]
        n += len(f)
        total = f.sum(0) if total is None else total + f.sum(0)
        total_sq = (f * f).sum(0) if total_sq is None else total_sq + (f * f).sum(0)
        for t in targets:
            rows = select_rows(meta, t)
            counts[t.name][0] += int((rows & ~test).sum())
            counts[t.name][1] += int((rows & test).sum())
            if t.kind == "classification":
                seen[t.name].update(np.unique(meta[t.column][rows & ~test]).tolist())
            elif t.column == "pred_box" and rows.any():
                scale[t.name] = max(scale[t.name], float(np.abs(meta[t.column][rows]).max()))
    if not n:
        return None
    mu = total / n
    sd = (total_sq / n - mu * mu).clamp_min(0).sqrt() + 1e-6
    heads = {}
    for t in targets:
        n_train, n_test = counts[t.name]
        if n_test < 5 or n_train < 10:
            continue
        if t.kind == "classification":
            classes = np.array(sorted(c for c in seen[t.name] if c >= 0), np.int64)
            if len(classes) < 2:
                continue
            lookup = np.full(int(classes.max()) + 1, -100, np.int64)
            lookup[classes] = np.arange(len(classes))
            heads[t.name] = _Head(t, classes, lookup)
        else:
            outputs = int(np.prod(lens_fields[t.column])) if t.column in lens_fields else 1
            heads[t.name] = _Head(t, np.zeros(0, np.int64), np.zeros(0, np.int64), scale[t.name], outputs)
    return mu.float(), sd.float(), heads, counts


def _meta(batch: dict[str, Any]) -> np.ndarray:
    """The structured metadata rows of a TokenLoader batch."""
    cols = [c for c in batch if c != "feats"]
    arrays = {c: batch[c].numpy() for c in cols}
    dtype = [(c, a.dtype, a.shape[1:]) for c, a in arrays.items()]
    out = np.empty(len(batch["feats"]), dtype)
    for c, a in arrays.items():
        out[c] = a
    return out


def _encode_batch(batch: dict[str, Any], heads: dict[str, _Head], s: ProbeSettings, split: str):
    """A TokenLoader batch → features + per-head labels, with the other split's rows masked out."""
    meta = _meta(batch)
    test = image_split(meta["image_id"], s.test_fraction, s.seed)
    use = test if split == "test" else ~test
    out = {"feats": batch["feats"]}
    for name, h in heads.items():
        rows = select_rows(meta, h.target) & use
        out[f"y/{name}"] = torch.from_numpy(h.labels(meta, rows))
        if h.target.kind == "regression":
            out[f"m/{name}"] = torch.from_numpy(rows)
    return out


def _probe_module(d: int, heads: dict[str, _Head], mu, sd, s: ProbeSettings, steps: int):
    import pytorch_lightning as pl
    import torch.nn.functional as F

    from blueglass.interp.train import lr_schedule, metric_key

    class ProbeModule(pl.LightningModule):
        """One linear head per target on standardised features, all heads in one matrix (one GEMM per
        batch); every head sees every batch."""

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(d, sum(h.width for h in heads.values()))
            bounds = np.cumsum([0] + [h.width for h in heads.values()])
            self.slices = {
                n: slice(int(a), int(b)) for n, a, b in zip(heads, bounds[:-1], bounds[1:], strict=True)
            }
            self.register_buffer("mu", mu)
            self.register_buffer("sd", sd)

        def scores(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.linear((feats.float() - self.mu) / self.sd)
            return {n: out[:, sl] for n, sl in self.slices.items()}

        def head(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
            sl = self.slices[name]
            return self.linear.weight[sl], self.linear.bias[sl]

        def training_step(self, batch, _i):
            total = s.l2 * self.linear.weight.pow(2).sum()
            logs = {}
            for name, out in self.scores(batch["feats"]).items():
                y = batch[f"y/{name}"]
                if heads[name].target.kind == "classification":
                    valid = (y >= 0).float()
                    per_row = F.cross_entropy(out.float(), y.clamp_min(0), reduction="none")
                else:
                    valid = batch[f"m/{name}"].float()
                    per_row = (out.float() - y).pow(2).mean(-1)
                loss = (per_row * valid).sum() / valid.sum().clamp_min(
                    1.0
                )  # masked mean over this head's rows
                total = total + loss
                logs[metric_key(s.log_prefix, name, "loss")] = loss.detach()
            self.log_dict(logs)
            return total

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=s.lr)
            warm = max(1, min(50, steps // 10))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(steps, warm))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ProbeModule()


def train_probes(
    lens: Any, point: str, targets: Sequence[ProbeTarget], s: ProbeSettings | None = None
) -> dict[str, ProbeResult]:
    """Train and score a probe for every target the point's rows support (too few rows or classes → none)."""
    from blueglass.features.lens import Lens, TokenLoader
    from blueglass.interp.train import Endless, TrainSettings, fit

    s = s or ProbeSettings()
    lens = lens if isinstance(lens, Lens) else Lens(lens)
    fields = set(lens.manifest.get("meta_fields", [])) or None
    targets = [t for t in targets if fields is None or t.column in fields]
    stats = _stats(lens, point, targets, s)
    if stats is None:
        return {}
    mu, sd, heads, counts = stats
    if not heads:
        return {}
    world = s.devices
    rows = int(lens.point(point)["rows"])
    steps = max(s.min_steps, s.epochs * max(1, math.ceil(rows / (s.batch_size * world))))
    torch.manual_seed(s.seed)
    module = _probe_module(int(lens.point(point)["d"]), heads, mu, sd, s, steps)
    data = Endless(
        TokenLoader(lens, point, batch_size=s.batch_size, seed=s.seed),
        transform=lambda b: _encode_batch(b, heads, s, "train"),
    )
    fit(
        module,
        data,
        TrainSettings(
            steps=steps,
            batch_size=s.batch_size,
            seed=s.seed,
            precision=s.precision,
            devices=s.devices,
            run_id=s.run_id,
            log_prefix=s.log_prefix,
        ),
    )
    # pass 3: scores of the test rows
    module = module.cpu().eval()
    scores: dict[str, list[np.ndarray]] = {n: [] for n in heads}
    labels: dict[str, list[np.ndarray]] = {n: [] for n in heads}
    with torch.no_grad():
        for batch in TokenLoader(lens, point, batch_size=1 << 16, shuffle=False, rank=0, world_size=1):
            enc = _encode_batch(batch, heads, s, "test")
            out = module.scores(enc["feats"])
            for n, h in heads.items():
                keep = enc[f"m/{n}"] if h.target.kind == "regression" else enc[f"y/{n}"] >= 0
                scores[n].append(out[n][keep].float().numpy())
                labels[n].append(enc[f"y/{n}"][keep].numpy())
    results = {}
    for n, h in heads.items():
        sc, y = np.concatenate(scores[n]), np.concatenate(labels[n])
        weight, bias = module.head(n)
        w = weight.detach().float().numpy() / module.sd.numpy()[None, :]
        b = bias.detach().float().numpy() - w @ module.mu.numpy()
        if h.target.kind == "regression":
            ss_res = ((sc - y) ** 2).sum()
            ss_tot = ((y - y.mean(0)) ** 2).sum()
            metrics = {"r2": float(1 - ss_res / max(ss_tot, 1e-12))}
            w, b = w * h.scale, b * h.scale  # predictions in the target's own units
            classes: list[int] = []
        else:
            metrics = _classification_metrics(sc, y, len(h.classes))
            classes = [int(c) for c in h.classes]
        results[n] = ProbeResult(n, h.target.kind, metrics, w, b, classes, *counts[n])
    return results


def _classification_metrics(scores: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """``y`` holds head indices (test rows of classes never seen in training are left out)."""
    pred = scores.argmax(1)
    idx = np.arange(n_classes)
    per_class = [float((pred[y == c] == c).mean()) for c in idx if (y == c).any()]
    majority = float(np.max(np.unique(y, return_counts=True)[1]) / len(y)) if len(y) else float("nan")
    return {
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean(per_class)) if per_class else float("nan"),
        "auroc": auroc_ovr(torch.from_numpy(scores).softmax(-1).numpy(), y, idx),
        "chance": majority,
    }
