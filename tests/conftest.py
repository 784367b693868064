"""Shared fixtures: a pre-migrated MLflow DB per test, a tiny toy world, tiny trained models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
SMOKE_PARAMS = REPO / "pipelines" / "smoke" / "params.yaml"


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An MLflow SQLite DB with all migrations applied (creating one takes seconds; copying it does not)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_project(tmp_path, migrated_db, monkeypatch) -> Path:
    """A temporary project root with its own copy of the migrated tracking DB."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("BLUEGLASS_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    import mlflow

    # MLflow keeps the last set_tracking_uri / set_registry_uri process-wide: point both at this test's DB,
    # so an earlier test's project can never receive this test's runs or registered models
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return tmp_path


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    from blueglass.data import generate_toyworld

    root = tmp_path_factory.mktemp("toy") / "toyworld"
    generate_toyworld(root, {"train": (40, 1, 3), "val": (10, 1, 3), "test_single": (12, 1, 1)}, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_params():
    from blueglass.config import load_params

    return load_params(SMOKE_PARAMS)


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory, toy_root, tiny_params) -> Path:
    import torch

    from blueglass.data import CocoDataset
    from blueglass.models.detector import save_detector
    from blueglass.training.common import load_split_arrays
    from blueglass.training.detector import train_detector

    torch.set_num_threads(1)
    ds = CocoDataset.load(toy_root / "train")
    model, _ = train_detector(tiny_params.models["toy-detector"], load_split_arrays(ds))
    folder = tmp_path_factory.mktemp("models") / "toy-detector"
    save_detector(
        model, folder, ds.category_names, {"name": "toy-detector", "category_ids": sorted(ds.categories)}
    )
    return folder


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory, toy_root, tiny_params) -> Path:
    from blueglass.data import CocoDataset
    from blueglass.training.common import load_split_arrays
    from blueglass.training.vlm import save_vlm, train_vlm

    ds = CocoDataset.load(toy_root / "train")
    model, tok, _ = train_vlm(
        tiny_params.models["toy-vlm"], load_split_arrays(ds), ds.concepts, ds.category_names
    )
    folder = tmp_path_factory.mktemp("models") / "toy-vlm"
    save_vlm(model, tok, folder)
    return folder


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory, tiny_detector, tiny_vlm) -> Path:
    """A project folder laid out like the pipeline leaves it (smoke params, data, trained tiny models)."""
    from blueglass.config import load_params
    from blueglass.data import generate_toyworld

    root = tmp_path_factory.mktemp("project")
    shutil.copy(SMOKE_PARAMS, root / "params.yaml")
    p = load_params(root / "params.yaml")
    splits = {k: (v.images, v.min_objects, v.max_objects) for k, v in p.dataset.splits.items()}
    generate_toyworld(root / p.dataset.path, splits, seed=p.dataset.seed)
    shutil.copytree(tiny_detector, root / "models" / "toy-detector")
    shutil.copytree(tiny_vlm, root / "models" / "toy-vlm")
    return root


def torchrun_cmd(port: int, *args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` CPU processes on a fixed rendezvous port."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(port),
        *args,
    ]
