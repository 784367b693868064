"""probe / sae stages on the smoke project: user errors, registry round trip of an SAE."""

import os
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import yaml

from blueglass.config import load_params
from blueglass.errors import BlueGlassError, ConfigError
from blueglass.features.lens import Lens


@pytest.fixture
def project(smoke_project, mlflow_project, tmp_path):
    from blueglass.stages import extract

    root = tmp_path / "proj"
    shutil.copytree(smoke_project, root, ignore=shutil.ignore_patterns("lens", "params-*.yaml"))
    p = load_params(root / "params.yaml")
    for name in ("toy-detector-test", "toy-detector-test-random"):
        extract.run(p, root, name)
    return root, p


def _with_sae(root, **changes):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["sae"]["runs"]["toy-detector-l0-topk"].update(changes)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(root / "params.yaml")


def test_sae_user_errors(project):
    from blueglass.stages import sae

    root, _ = project
    with pytest.raises(
        ConfigError, match=r"sae.runs.toy-detector-l0-topk.sweep.topk: k \(500\) must be in 1..d_sae \(64\)"
    ):
        sae.run(_with_sae(root, k=500), root, "toy-detector-l0-topk")
    with pytest.raises(BlueGlassError, match=r"no point 'vit.layers.7' \(points: "):
        sae.run(_with_sae(root, k=4, point="vit.layers.7"), root, "toy-detector-l0-topk")
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "blueglass.cli", "sae", "nope", "--params", str(root / "params.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == "error: sae.runs.nope: no such SAE run (runs: toy-detector-l0-topk, toy-detector-ln-topk)"
    )


def test_sae_and_probe_stages_register_loadable_models(project, monkeypatch):
    from blueglass.stages import probe, sae

    root, p = project
    s = sae.run(p, root, "toy-detector-l0-topk")
    assert set(s) == {"topk", "relu"}  # the sweep: two SAEs from one pass
    assert s["topk"]["registry"]["alias"] == "champion" and s["topk"]["fvu"] >= 0 and s["topk"]["steps"] == 5
    assert s["relu"]["registry"]["name"] == "toy-detector.vit.layers.0.sae-relu"
    assert (root / "models" / "saes" / "toy-detector-l0-topk" / "relu" / "cfg.json").is_file()
    assert not (root / "checkpoints" / "sae" / "toy-detector-l0-topk").exists()  # removed once finished
    assert (root / "reports" / "latents" / "toy-detector-l0-topk" / "relu" / "latents.json").is_file()
    # training curves reach the stage's MLflow run through Lightning's MLflow logger
    client = mlflow.MlflowClient()
    run_id = client.get_model_version_by_alias("toy-detector.vit.layers.0.sae-relu", "champion").run_id
    curve = client.get_metric_history(run_id, "train/relu/loss")
    assert len(curve) >= 2 and curve[-1].step > curve[0].step
    out = probe.run(p, root, "toy-detector")
    assert "toy-detector.vit.layers.0.probe-color" in out["registered"]
    # the per-layer curve runs in the model's order, input to output (not the manifest's sorted keys)
    assert [r["point"] for r in out["curve"]] == ["vit.layers.0", "vit.layernorm", "head"]
    probe_run = client.get_model_version_by_alias("toy-detector.vit.layers.0.probe-color", "champion").run_id
    assert client.get_metric_history(probe_run, "train/control/vit.layers.0/color/loss")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    feats = Lens(root / "lens" / "toy-detector-test").load_point("vit.layers.0")[0][:5].astype(np.float32)
    codes = mlflow.pyfunc.load_model("models:/toy-detector.vit.layers.0.sae-topk@champion").predict(feats)
    assert codes.shape == (5, 64) and ((codes.to_numpy() > 0).sum(1) <= 4).all()
    scores = mlflow.pyfunc.load_model("models:/toy-detector.vit.layers.0.probe-color@champion").predict(feats)
    assert scores.shape[0] == 5


def test_patch_stage_reports_recovered_and_registers_patched_models(project, monkeypatch):
    from blueglass.stages import patch, probe, sae

    root, p = project
    with pytest.raises(ConfigError, match=r"patch.runs.nope: no such patch run \(runs: toy-detector\)"):
        patch.run(p, root, "nope")
    with pytest.raises(ConfigError, match=r"models/saes/toy-detector-l0-topk/topk not found"):
        patch.run(p, root, "toy-detector")  # nothing trained yet: one line, nothing written
    assert not (root / "metrics" / "patch_toy-detector.json").exists()
    from blueglass.stages import train_model  # noqa: F401  (the base model must be registered)
    from blueglass.tracking import register_model, start_run

    with start_run("train_model", run_name="base"):
        register_model(
            root / "models" / "toy-detector", "toy-detector", description="base", metrics={}, headline="AP"
        )
    sae.run(p, root, "toy-detector-l0-topk")
    sae.run(p, root, "toy-detector-ln-topk")
    probe.run(p, root, "toy-detector")
    out = patch.run(p, root, "toy-detector")
    ivs = out["interventions"]
    assert set(ivs) == {"sae-topk", "sae-relu", "sae-ln", "steer-color", "clamp-latents"}
    for n, r in ivs.items():
        assert r["metric_clean"] == pytest.approx(out["clean"]["AP50"])
        assert r["sites"] == (["vit.layernorm"] if n == "sae-ln" else ["vit.layers.0"])
        if r["recovered"] is not None:
            z = r["metric_zero_ablation"]
            assert r["recovered"] == pytest.approx((r["metric_patched"] - z) / (r["metric_clean"] - z))
    # the SAE reconstructions at both sites at once, against the joint ablations of both sites
    joint = out["joint"]
    assert joint["sites"] == ["vit.layernorm", "vit.layers.0"] and joint["metric_patched"] is not None
    assert set(out["sites"]) == {"vit.layernorm", "vit.layers.0"}
    client = mlflow.MlflowClient()
    v = client.get_model_version("toy-detector+sae-topk@vit.layers.0", ivs["sae-topk"]["registry"]["version"])
    assert v.tags["base"] == "toy-detector/1" and v.tags["sae"] == "toy-detector.vit.layers.0.sae-topk/1"
    sae_v = client.get_model_version("toy-detector.vit.layers.0.sae-topk", "1")
    assert ivs["sae-topk"]["recovered"] is not None, out["clean"]  # the zero ablation must hurt
    assert float(sae_v.tags["recovered"]) == pytest.approx(ivs["sae-topk"]["recovered"], rel=1e-5)
    assert (root / "plots" / "patch_toy-detector.csv").read_text().startswith("intervention,site,clean")
    # the registered patched model loads its base model and SAE from the registry and applies the SAE
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    import pandas as pd

    from blueglass.stages.train_model import load_split

    frame = pd.DataFrame({"image_path": [str(r.path) for r in load_split(p, root, "test").images[:4]]})
    patched = mlflow.pyfunc.load_model("models:/toy-detector+sae-relu@vit.layers.0@champion").predict(frame)
    base = mlflow.pyfunc.load_model("models:/toy-detector/1").predict(frame)
    assert list(patched.columns) == list(base.columns) and not patched.equals(base)
    # registry review: SAE versions show their reconstruction metrics and recovered; champions by recovered
    from blueglass.tracking import list_registry, promote_by

    row = next(r for r in list_registry("toy-detector.vit.layers.0.sae-topk") if r.version == "1")
    assert row.value("fvu") is not None and row.value("l0") is not None
    assert row.value("recovered") == pytest.approx(ivs["sae-topk"]["recovered"], rel=1e-5)
    chosen = promote_by("recovered")
    assert {n for n, _, _ in chosen} == {
        "toy-detector.vit.layers.0.sae-topk",
        "toy-detector.vit.layers.0.sae-relu",
        "toy-detector.vit.layernorm.sae-topk",
    }
    listing = subprocess.run(
        [sys.executable, "-m", "blueglass.cli", "registry", "list", "--name", ".sae-"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listing.returncode == 0 and "recovered" in listing.stdout, listing.stderr
