"""The one module that knows MLflow: tracking URI, runs and their tags, inputs, the model registry.

* Backend: SQLite at ``<project root>/mlflow.db`` (an absolute URI, so every working directory shares one
  DB); ``MLFLOW_TRACKING_URI`` overrides it. Artifacts go under ``<project root>/mlruns/``.
* Every run is tagged with the git commit and dirty flag, the DVC stage (``DVC_STAGE``, set by
  ``dvc repro``) and the BlueGlass version, and records its inputs' fingerprints.
* Models are registered as pyfunc models *defined from code* (``blueglass/models/pyfunc_model.py``) with
  the weights folder as an artifact: no cloudpickle, so they load with
  ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.
* A new version becomes ``champion`` when there is none or it beats the champion on its headline metric,
  ``challenger`` otherwise; the ``alias_reason`` tag says why.
* wandb is an optional mirror of params and metrics, off unless ``tracking.wandb.enabled``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blueglass
from blueglass.errors import BlueGlassError

PYFUNC_CODE = Path(__file__).parent / "models" / "pyfunc_model.py"
PIP_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pillow>=10",
    "pandas",
    "pydantic>=2.7,<3",
]


# ---------------------------------------------------------------- where things live
def project_root() -> Path:
    """``BLUEGLASS_ROOT``, else ``DVC_ROOT`` (set by dvc repro), else the nearest folder up from the
    working directory holding ``dvc.yaml`` or ``.git``, else the working directory."""
    for var in ("BLUEGLASS_ROOT", "DVC_ROOT"):
        if os.environ.get(var):
            return Path(os.environ[var]).resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "dvc.yaml").exists() or (d / ".git").exists():
            return d
    return cwd


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> Path:
    return (root or project_root()) / "mlruns"


def configure(experiment: str = "blueglass", root: Path | None = None) -> str:
    """Point MLflow at the project's DB; create the experiment if needed; return its id."""
    import mlflow

    root = root or project_root()
    configure_registry_only(root)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    art = artifact_root(root)
    art.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(experiment, artifact_location=art.as_uri())


# ---------------------------------------------------------------- tags
def git_state(root: Path | None = None) -> tuple[str, bool]:
    """(commit sha or "unknown", dirty flag) of the project checkout."""
    root = root or project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def base_tags(stage: str) -> dict[str, str]:
    sha, dirty = git_state()
    return {
        "blueglass.version": blueglass.__version__,
        "blueglass.stage": stage,
        "git.commit": sha,
        "git.dirty": str(dirty).lower(),
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "mlflow.source.git.commit": sha,
    }


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------- runs
@dataclass
class Run:
    """A thin handle on an active MLflow run (plus the optional wandb mirror)."""

    run_id: str
    _wandb: Any = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        if self._wandb is not None:
            self._wandb.config.update(flat, allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Nested dicts are flattened with ``/``; ``None`` (undefined) values are skipped."""
        import mlflow

        flat = {
            k: float(v) for k, v in flatten(metrics, sep="/").items() if isinstance(v, int | float) and v == v
        }
        if flat:
            mlflow.log_metrics(flat, step=step)
        if self._wandb is not None and flat:
            self._wandb.log(flat, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_input(self, name: str, digest: str, source: str, context: str) -> None:
        """Record a fingerprinted input (dataset, Lens, model weights) as an MLflow dataset input."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # MLflow registers its local source class twice and says so
            warnings.simplefilter("ignore", UserWarning)
            src = resolve_dataset_source(Path(source).resolve().as_uri())
        ds = MetaDataset(source=src, name=name, digest=digest[:36])
        mlflow.log_input(ds, context=context)
        mlflow.set_tag(f"input.{context}.{name}.sha256", digest)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def start_run(
    stage: str,
    *,
    run_name: str,
    experiment: str = "blueglass",
    nested: bool = False,
    wandb_cfg: Any = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Run]:
    import mlflow

    exp_id = configure(experiment)
    all_tags = {**base_tags(stage), **(tags or {})}
    wb = _start_wandb(wandb_cfg, run_name, all_tags) if not nested else None
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested, tags=all_tags) as active:
        try:
            yield Run(active.info.run_id, wb)
        finally:
            if wb is not None:
                wb.finish()


def is_main_process() -> bool:
    """False in the extra processes of a DDP job (torchrun's ``RANK`` or Lightning's ``LOCAL_RANK``), which
    must not open runs, register models or write stage outputs."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def lightning_logger(run_id: str) -> Any:
    """Lightning's MLflow logger writing into the (already started) run ``run_id`` of the project's store."""
    import mlflow
    from pytorch_lightning.loggers import MLFlowLogger

    class _Logger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:  # the stage, not Lightning, ends the run
            pass

    return _Logger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id)


@contextlib.contextmanager
def main_run(
    stage: str, *, run_name: str, experiment: str, wandb_cfg: Any = None, tags=None
) -> Iterator[Run | None]:
    """:func:`start_run` in the main process; ``None`` in the extra processes of a DDP job."""
    if not is_main_process():
        yield None
        return
    with start_run(stage, run_name=run_name, experiment=experiment, wandb_cfg=wandb_cfg, tags=tags) as r:
        yield r


def _start_wandb(cfg: Any, run_name: str, tags: Mapping[str, str]) -> Any:
    if cfg is None or not getattr(cfg, "enabled", False):
        return None
    try:
        import wandb
    except ImportError:
        raise BlueGlassError(
            "tracking.wandb.enabled is true but wandb is not installed (pip install 'blueglass[wandb]')"
        ) from None
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=run_name,
        tags=[f"{k}={v}" for k, v in tags.items() if v][:20],
    )


# ---------------------------------------------------------------- registry
def register_model(
    folder: Path,
    name: str,
    *,
    description: str,
    metrics: Mapping[str, float],
    headline: str,
    tags: Mapping[str, str] | None = None,
    higher_is_better: bool = True,
    input_dim: int | None = None,
) -> tuple[str, str]:
    """Log ``folder`` as a pyfunc model in the active run and register it as ``name``.

    Sets description and tags (``metric.<k>`` for every metric, ``headline_metric``, ``weights_sha256`` …),
    then the alias: ``champion`` when there is none or this version beats it on ``headline``, else
    ``challenger``. ``input_dim`` marks an SAE / probe (activations in). Returns (version, alias).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from blueglass.models.base import weights_sha256

    if input_dim is None:  # a base model: images in
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "image_path")]),
            params=ParamSchema([ParamSpec("prompts", "string", default="")]),
        )
    else:  # an SAE or probe: activations in
        import numpy as np
        from mlflow.types import TensorSpec

        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, input_dim))]))
    with warnings.catch_warnings():
        # MLflow nags about type hints and input examples; the explicit signature above is the contract.
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"model": str(folder)},
            code_paths=[str(Path(blueglass.__file__).parent)],
            pip_requirements=PIP_REQUIREMENTS,
            signature=signature,
        )
    client = MlflowClient()
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name, description=f"BlueGlass model '{name}'. {description}")
    run = mlflow.active_run()
    mv = client.create_model_version(name, info.model_uri, run_id=run.info.run_id if run else None)
    version = str(mv.version)
    client.update_model_version(name, version, description=description)
    all_tags = {
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if v is not None},
        "headline_metric": headline,
        "weights_sha256": weights_sha256(folder),
        "git.commit": git_state()[0],
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "blueglass.version": blueglass.__version__,
        **(tags or {}),
    }
    for k, v in all_tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    alias, reason = _choose_alias(client, name, version, metrics.get(headline), headline, higher_is_better)
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "alias_reason", reason)
    return version, alias


def _choose_alias(
    client, name: str, version: str, value: float | None, headline: str, higher: bool
) -> tuple[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return "champion", f"first version with a {headline} score"
    if str(champ.version) == str(version):
        return "champion", "already champion"
    cur = champ.tags.get(f"metric.{headline}")
    if value is None:
        return "challenger", f"no {headline} value to compare with champion v{champ.version}"
    if cur is None:
        return "champion", f"champion v{champ.version} has no {headline} tag"
    better = value > float(cur) if higher else value < float(cur)
    rel = ">" if value > float(cur) else "<=" if higher else ">="
    if better:
        return "champion", f"{headline} {value:.4f} {rel} champion v{champ.version} {float(cur):.4f}"
    return "challenger", f"{headline} {value:.4f} {rel} champion v{champ.version} {float(cur):.4f}"


def find_version(name: str, sha256: str) -> str | None:
    """The newest version of registered model ``name`` whose ``weights_sha256`` tag is ``sha256``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_registry_only()
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    hits = [int(v.version) for v in versions if v.tags.get("weights_sha256") == sha256]
    return str(max(hits)) if hits else None


def tag_versions_by_weights(name: str, sha256: str, tags: Mapping[str, Any]) -> list[str]:
    """Add tags to every version of ``name`` whose ``weights_sha256`` matches (benchmark → registry)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_registry_only()
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    hits = [v for v in versions if v.tags.get("weights_sha256") == sha256]
    for v in hits:
        for k, val in tags.items():
            client.set_model_version_tag(name, v.version, k, str(val))
    return [v.version for v in hits]


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: str
    aliases: tuple[str, ...]
    headline: str
    metrics: dict[str, str]
    created: int
    description: str
    tags: dict[str, str]

    def value(self, key: str) -> float | None:
        """A numeric tag: ``recovered`` or ``metric.<key>``; None when absent."""
        raw = self.tags.get(key, self.tags.get(f"metric.{key}"))
        try:
            return float(raw) if raw not in (None, "", "None") else None
        except ValueError:
            return None


def list_registry(name_filter: str | None = None) -> list[VersionRow]:
    from mlflow import MlflowClient

    configure_registry_only()
    client = MlflowClient()
    rows = []
    for rm in client.search_registered_models():
        if name_filter and name_filter not in rm.name:
            continue
        by_version: dict[str, list[str]] = {}
        for alias, ver in (client.get_registered_model(rm.name).aliases or {}).items():
            by_version.setdefault(str(ver), []).append(alias)
        for v in client.search_model_versions(f"name = '{rm.name}'"):
            rows.append(
                VersionRow(
                    name=rm.name,
                    version=str(v.version),
                    aliases=tuple(sorted(by_version.get(str(v.version), []))),
                    headline=v.tags.get("headline_metric", ""),
                    metrics={
                        k.removeprefix("metric."): val for k, val in v.tags.items() if k.startswith("metric.")
                    },
                    created=int(v.creation_timestamp or 0),
                    description=v.description or "",
                    tags=dict(v.tags),
                )
            )
    return sorted(rows, key=lambda r: (r.name, int(r.version)))


def promote(name: str, version: str, alias: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_registry_only()
    client = MlflowClient()
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise BlueGlassError(f"registry: no version {version} of model '{name}'") from None
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "alias_reason", f"set to {alias} by hand")


def promote_by(
    key: str, name_filter: str = ".sae-", higher_is_better: bool = True
) -> list[tuple[str, str, float]]:
    """Make the version with the best ``key`` tag (e.g. ``recovered``) ``champion`` of each registered model
    whose name contains ``name_filter`` (SAEs: one registered model per point and variant). Returns the
    (name, version, value) chosen; models without any version carrying ``key`` are left alone."""
    from mlflow import MlflowClient

    best: dict[str, tuple[str, float]] = {}
    for row in list_registry(name_filter):
        v = row.value(key)
        if v is None:
            continue
        if row.name not in best or (v > best[row.name][1] if higher_is_better else v < best[row.name][1]):
            best[row.name] = (row.version, v)
    client = MlflowClient()
    for name, (version, v) in best.items():
        client.set_registered_model_alias(name, "champion", version)
        client.set_model_version_tag(name, version, "alias_reason", f"best {key} ({v:.4g}) among versions")
    return [(n, ver, v) for n, (ver, v) in sorted(best.items())]


def configure_registry_only(root: Path | None = None) -> None:
    """Point MLflow's tracking and registry clients at the project's DB (no experiment needed)."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
