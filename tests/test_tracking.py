"""Registry round trip on a temporary SQLite DB: register, alias rules, load back without pickle."""

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from blueglass import tracking


def _register(folder, ap50, name="toy-detector"):
    with tracking.start_run("train_model", run_name="t"):
        return tracking.register_model(
            folder, name, description="a test model", metrics={"AP50": ap50, "val.AP": 0.5}, headline="AP50"
        )


def test_tracking_uri_is_absolute_under_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("BLUEGLASS_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.tracking_uri() == "sqlite:////elsewhere/x.db"


def test_runs_carry_lineage_tags(mlflow_project, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "benchmark")
    with tracking.start_run("benchmark", run_name="r") as run:
        run.log_params({"a": {"b": 1}})
        run.log_metrics({"x": {"AP50": 0.5, "APl": None}})
        run.log_input("toy-test", "ab" * 32, mlflow_project, context="eval")
    r = MlflowClient().get_run(run.run_id)
    assert r.data.params == {"a.b": "1"}
    assert r.data.metrics == {"x/AP50": 0.5}
    tags = r.data.tags
    assert tags["dvc.stage"] == "benchmark" and tags["blueglass.stage"] == "benchmark"
    assert tags["git.dirty"] in {"true", "false"} and tags["git.commit"]
    assert tags["blueglass.version"]
    assert tags["input.eval.toy-test.sha256"] == "ab" * 32
    assert r.inputs.dataset_inputs[0].dataset.name == "toy-test"
    assert r.info.artifact_uri.startswith((mlflow_project / "mlruns").as_uri())


def test_registry_round_trip(mlflow_project, tiny_detector, toy_root, monkeypatch):
    v1, a1 = _register(tiny_detector, 0.40)
    v2, a2 = _register(tiny_detector, 0.30)
    v3, a3 = _register(tiny_detector, 0.55)
    assert (v1, a1, v2, a2, v3, a3) == ("1", "champion", "2", "challenger", "3", "champion")
    client = MlflowClient()
    mv2 = client.get_model_version("toy-detector", "2")
    assert mv2.tags["alias_reason"] == "AP50 0.3000 <= champion v1 0.4000"
    assert mv2.tags["metric.AP50"] == "0.3" and mv2.tags["headline_metric"] == "AP50"
    assert len(mv2.tags["weights_sha256"]) == 64 and mv2.description == "a test model"
    assert str(client.get_model_version_by_alias("toy-detector", "champion").version) == "3"

    # load back with pickle deserialization disabled, in a fresh process
    image = sorted((toy_root / "val" / "images").glob("*.png"))[0]
    code = (
        "import mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/toy-detector@champion')\n"
        f"out = m.predict(pd.DataFrame({{'image_path': ['{image}']}}))\n"
        "print(list(out.columns)); print(len(out))\n"
    )
    env = {**__import__("os").environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['image_index', 'x0', 'y0', 'x1', 'y1', 'score', 'label']" in proc.stdout

    tracking.promote("toy-detector", "1", "champion")
    assert str(client.get_model_version_by_alias("toy-detector", "champion").version) == "1"
    rows = tracking.list_registry()
    assert [(r.name, r.version) for r in rows] == [
        ("toy-detector", "1"),
        ("toy-detector", "2"),
        ("toy-detector", "3"),
    ]
    assert rows[0].aliases == ("champion",) and rows[0].metrics["AP50"] == "0.4"


def test_zero_shot_model_loads_and_scores_prompts(mlflow_project, tiny_vlm, toy_root, monkeypatch):
    with tracking.start_run("train_model", run_name="vlm"):
        version, alias = tracking.register_model(
            tiny_vlm, "toy-vlm", description="vlm", metrics={"accuracy": 0.5}, headline="accuracy"
        )
    assert alias == "champion"
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model("models:/toy-vlm@champion")
    image = str(sorted((toy_root / "test_single" / "images").glob("*.png"))[0])
    out = model.predict(pd.DataFrame({"image_path": [image]}), params={"prompts": "a red object|a circle"})
    assert list(out.columns) == ["a red object", "a circle"] and len(out) == 1


def test_promote_unknown_version(mlflow_project):
    from blueglass.errors import BlueGlassError

    with pytest.raises(BlueGlassError, match="no version 7 of model 'ghost'"):
        tracking.promote("ghost", "7", "champion")


def test_wandb_mirror_is_optional(mlflow_project, monkeypatch):
    import builtins

    from blueglass.config import WandbParams
    from blueglass.errors import BlueGlassError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    # disabled (the default): no wandb import is attempted at all
    with tracking.start_run("prepare", run_name="off", wandb_cfg=WandbParams()):
        pass
    with (
        pytest.raises(BlueGlassError, match=r"wandb is not installed \(pip install 'blueglass\[wandb\]'\)"),
        tracking.start_run("prepare", run_name="on", wandb_cfg=WandbParams(enabled=True)),
    ):
        pass
