"""The pipeline itself: `dvc repro` in a scratch git + DVC repo with the smoke params, as a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMOKE_PARAMS
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture
def scratch_repo(tmp_path, migrated_db):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(SMOKE_PARAMS, repo / "params.yaml")
    shutil.copytree(REPO / "blueglass", repo / "blueglass", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(migrated_db, repo / "mlflow.db")
    # no MLflow / project settings leak in from the test process (set_tracking_uri / set_registry_uri
    # export MLFLOW_* variables): the pipeline must find its own DB at the repo root
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLFLOW_") and k not in {"BLUEGLASS_ROOT", "DVC_STAGE"}
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "scratch"], repo, env)
    return repo, env


def test_dvc_repro_end_to_end(scratch_repo):
    repo, env = scratch_repo
    first = _run(["dvc", "repro"], repo, env)
    for stage in (
        "prepare",
        "train_model@toy-detector",
        "train_model@toy-vlm",
        "benchmark",
        "extract@toy-detector-test",
        "extract@toy-vlm-test_single",
        "extract@toy-detector-test-random",
        "probe@toy-detector",
        "sae@toy-detector-l0-topk",
        "sae@toy-detector-ln-topk",
        "patch@toy-detector",
        "report",
    ):
        assert f"Running stage '{stage}'" in first

    metrics = json.loads((repo / "metrics" / "benchmark.json").read_text())
    assert 0.0 <= metrics["toy-detector@test"]["AP50"] <= 1.0
    assert set(metrics["toy-detector@test"]) >= {
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR100",
        "per_class",
    }
    assert 0.0 <= metrics["toy-vlm@test_single"]["accuracy"] <= 1.0
    assert set(metrics["toy-vlm@test_single"]) >= {"color", "shape", "color_shape"}
    assert "| toy-detector@test |" in (repo / "reports" / "benchmark.md").read_text()
    assert (repo / "models" / "toy-detector" / "model.safetensors").is_file()
    assert (repo / "models" / "toy-vlm" / "tokenizer.json").is_file()
    assert not (repo / "mlruns").joinpath("0", "meta.yaml").exists()  # never the file store

    # the registry in the project's DB holds both models, tagged with the test metrics by benchmark
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    det = client.get_model_version_by_alias("toy-detector", "champion")
    vlm = client.get_model_version_by_alias("toy-vlm", "champion")
    assert "metric.test.AP50" in det.tags and det.tags["dvc.stage"] == "train_model@toy-detector"
    assert "metric.test_single.accuracy" in vlm.tags
    runs = client.search_runs(
        [client.get_experiment_by_name("blueglass-smoke").experiment_id],
        "tags.`blueglass.stage` = 'benchmark'",
    )
    assert len(runs) == 3  # one parent + one nested run per model × split
    assert {r.data.tags.get("dvc.stage") for r in runs} == {"benchmark"}

    second = _run(["dvc", "repro"], repo, env)
    assert "Running stage" not in second

    # the Lens is a DVC output: it verifies, and it travels through a remote with push / pull
    lens = repo / "lens" / "toy-detector-test"
    assert "OK:" in _run(["blueglass", "lens", "verify", str(lens)], repo, env)
    extract_run = client.search_runs(
        [client.get_experiment_by_name("blueglass-smoke").experiment_id],
        "tags.lens = 'toy-detector-test' and tags.`blueglass.stage` = 'extract'",
    )[0]
    assert (
        extract_run.data.metrics["rows"] > 0
        and extract_run.data.tags["dvc.stage"] == "extract@toy-detector-test"
    )
    assert any(i.dataset.name == "lens-toy-detector-test" for i in extract_run.inputs.dataset_inputs)
    shown = _run(["dvc", "metrics", "show"], repo, env)
    assert "AP50" in shown and "accuracy" in shown and "fvu" in shown and "control_accuracy" in shown

    # probes and SAEs: per-layer curve, DVC plots, registry entries
    curve = (repo / "plots" / "probe_toy-detector.csv").read_text().splitlines()
    assert curve[0].startswith("depth,point,") and "color_control" in curve[0] and len(curve) == 1 + 3
    _run(["dvc", "plots", "show", "-o", str(repo / "dvc_plots")], repo, env)
    assert (repo / "dvc_plots" / "index.html").is_file()
    probe_v = client.get_model_version_by_alias("toy-detector.vit.layers.0.probe-color", "champion")
    sae_v = client.get_model_version_by_alias("toy-detector.vit.layers.0.sae-topk", "champion")
    assert (
        "metric.accuracy" in probe_v.tags
        and "metric.fvu" in sae_v.tags
        and sae_v.tags["headline_metric"] == "fvu"
    )
    assert (repo / "models" / "saes" / "toy-detector-l0-topk" / "topk" / "cfg.json").is_file()
    # patched evaluations: recovered on the SAE's own version, patched models registered, the report built
    patch = json.loads((repo / "metrics" / "patch_toy-detector.json").read_text())
    assert set(patch["interventions"]) == {"sae-topk", "sae-relu", "sae-ln", "steer-color", "clamp-latents"}
    assert patch["joint"]["sites"] == ["vit.layernorm", "vit.layers.0"]
    assert float(sae_v.tags["recovered"]) == pytest.approx(
        patch["interventions"]["sae-topk"]["recovered"], rel=1e-5
    )
    assert client.get_model_version_by_alias("toy-detector+sae-topk@vit.layers.0", "champion").tags["base"]
    assert "recovered" in shown
    html = (repo / "reports" / "index.html").read_text()
    assert "sae-topk" in html and "latents/toy-detector-l0-topk/topk/" in html

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["benchmark"]["batch_size"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = _run(["dvc", "repro"], repo, env)
    assert "Running stage 'benchmark'" in third
    assert third.count("Running stage") == 1

    digests = {f.name: f.read_bytes() for f in lens.rglob("*.tar")}
    remote = repo.parent / "remote"
    _run(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    _run(["dvc", "push"], repo, env)
    shutil.rmtree(lens)
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(["dvc", "pull", "extract@toy-detector-test"], repo, env)
    assert {f.name: f.read_bytes() for f in lens.rglob("*.tar")} == digests
    assert "OK:" in _run(["blueglass", "lens", "verify", str(lens)], repo, env)
