import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from blueglass.config import load_params
from blueglass.errors import ConfigError


def _write(tmp_path, mutate):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert set(p.models) == {"toy-detector", "toy-vlm"}
    assert p.models["toy-detector"].kind == "toy-detector"
    assert {r.model for r in p.benchmark.runs} == set(p.models)


BAD = [
    (
        lambda r: r["models"]["toy-detector"]["train"].update(stepz=3),
        "models.toy-detector.train.stepz: unknown key",
    ),
    (
        lambda r: r["models"]["toy-detector"]["train"].update(steps=-5),
        "models.toy-detector.train.steps: Input should be greater than 0 (got -5)",
    ),
    (
        lambda r: r["models"]["toy-vlm"]["train"].update(lr="fast"),
        "models.toy-vlm.train.lr: Input should be a valid number",
    ),
    (
        lambda r: r["dataset"]["splits"]["train"].update(min_objects=5, max_objects=2),
        "dataset.splits.train: min_objects (5) exceeds max_objects (2)",
    ),
    (
        lambda r: r["dataset"].update(image_size=8),
        "dataset.image_size: Input should be greater than or equal to 32 (got 8)",
    ),
    (
        lambda r: r["benchmark"]["runs"].append({"model": "nope", "split": "test"}),
        "benchmark.runs.2.model: unknown model 'nope'",
    ),
    (
        lambda r: r["models"]["toy-detector"].update(kind="yolo"),
        "models.toy-detector: Input tag 'yolo' found using 'kind' does not match",
    ),
    (lambda r: r.update(extra_section={}), "extra_section: unknown key"),
    (
        lambda r: r["extract"]["lenses"]["toy-vlm-test_single"].update(split="holdout"),
        "extract.lenses.toy-vlm-test_single.split: unknown split 'holdout'",
    ),
    (lambda r: r["extract"].update(dtype="int8"), "extract.dtype: Input should be 'float16' or 'float32'"),
    (
        lambda r: r["sae"]["runs"]["toy-detector-l3-topk"].update(variant="gated"),
        "sae.runs.toy-detector-l3-topk.variant: Input should be 'relu', 'topk', 'batchtopk', 'jumprelu' or 'matryoshka'",
    ),
    (
        lambda r: r["sae"]["runs"]["toy-detector-l3-topk"].update(lr=-0.001),
        "sae.runs.toy-detector-l3-topk.lr: Input should be greater than 0 (got -0.001)",
    ),
    (
        lambda r: r["sae"]["runs"]["toy-detector-l3-topk"].update(sweep={"a": {"steps": 5}}),
        "sae.runs.toy-detector-l3-topk: sweep.a: 'steps' cannot vary within a sweep",
    ),
    (
        lambda r: r["sae"]["runs"]["toy-detector-l3-topk"].update(sweep={"b": {"variant": "gated"}}),
        "sae.runs.toy-detector-l3-topk: sweep.b.variant: Input should be 'relu', 'topk'",
    ),
    (
        lambda r: r["probe"]["runs"]["toy-detector"].update(control="nope"),
        "probe.runs.toy-detector.control: unknown Lens 'nope'",
    ),
    (lambda r: r["runtime"].update(device="tpu"), "runtime.device: Input should be 'auto', 'cpu' or 'cuda'"),
    (
        lambda r: r["models"]["toy-detector"]["vit"].update(hidden_size=130, heads=4),
        "hidden_size (130) must be divisible by heads (4)",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), BAD)
def test_bad_params_are_one_clear_line(tmp_path, mutate, message):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_unreadable_params(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(bad)


@pytest.mark.parametrize("command", [["prepare"], ["train-model", "toy-detector"], ["benchmark"]])
def test_cli_rejects_bad_params_before_writing_anything(tmp_path, command):
    path = _write(tmp_path, lambda r: r["models"]["toy-detector"]["train"].update(steps=0))
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "blueglass.cli", *command, "--params", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: {path}: models.toy-detector.train.steps: Input should be greater than 0 (got 0)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_missing_prerequisite_is_one_line(tmp_path):
    raw = yaml.safe_load((REPO / "pipelines" / "smoke" / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "blueglass.cli", "benchmark"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: {tmp_path / 'models' / 'toy-detector'}: model folder not found (run `blueglass train-model toy-detector` first)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
