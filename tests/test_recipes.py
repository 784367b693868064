"""The recipes are runnable: every recipe's params validate, and detr-coco runs end to end with
``dvc repro`` in its folder on a tiny random DETR saved to disk and a toy-world split laid out as COCO
(``val2017/`` + ``annotations/instances_val2017.json``) — benchmark → extract → SAE → patch.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from tiny_models import tiny_detr

RECIPES = ["detr-coco", "grounding-dino-coco", "owlvit-coco", "clip-zero-shot", "dinov2-probe"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_params_validate(recipe):
    from blueglass.config import load_params

    p = load_params(REPO / "pipelines" / recipe / "params.yaml")
    assert p.dataset.kind == "coco" and all(m.kind in ("hf", "torchvision") for m in p.models.values())
    assert (REPO / "pipelines" / recipe / "dvc.yaml").is_file()


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _toy_coco(root: Path) -> None:
    """A toy-world split in COCO's own layout."""
    from blueglass.data import generate_toyworld

    generate_toyworld(root / "gen", {"val": (24, 1, 3)}, seed=5)
    (root / "annotations").mkdir(parents=True)
    shutil.move(root / "gen" / "val" / "images", root / "val2017")
    shutil.move(root / "gen" / "val" / "annotations.json", root / "annotations" / "instances_val2017.json")
    shutil.rmtree(root / "gen")


@pytest.mark.slow
def test_detr_coco_recipe_end_to_end(tmp_path, migrated_db):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "blueglass", repo / "blueglass", ignore=shutil.ignore_patterns("__pycache__"))
    recipe = repo / "pipelines" / "detr-coco"
    shutil.copytree(REPO / "pipelines" / "detr-coco", recipe)
    shutil.copy(migrated_db, repo / "mlflow.db")
    tiny_detr(repo / "weights" / "detr-resnet-50", num_queries=12)
    _toy_coco(repo / "data" / "coco")
    # the recipe as shipped, shrunk to seconds: a 64 px input, a 12-image mini split, a 5-step SAE
    params = yaml.safe_load((recipe / "params.yaml").read_text())
    params["models"]["detr"]["image_size"] = 64
    params["dataset"]["splits"]["val-mini"]["mini"] = 12
    params["runtime"]["threads"] = 1
    params["benchmark"]["batch_size"] = 8
    params["extract"].update(batch_size=6, block_images=6, blocks_per_shard=1)
    params["sae"]["runs"]["detr-dec5-topk"].update(
        point="model.decoder.layers.1", expansion=2, k=4, aux_k=8, dead_tokens=100, steps=5, batch_size=16
    )
    (recipe / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {
        k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "BLUEGLASS_ROOT", "DVC_STAGE"}
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "s"],
    ):
        _run(cmd, repo, env)
    out = _run(["dvc", "repro"], recipe, env)
    for stage in ("prepare", "benchmark", "extract@detr-val-mini", "sae@detr-dec5-topk", "patch@detr"):
        assert f"Running stage '{stage}'" in out

    bench = json.loads((recipe / "metrics" / "benchmark.json").read_text())["detr@val"]
    assert bench["task"] == "detection" and bench["images"] == 24 and 0.0 <= bench["AP50"] <= 1.0
    assert set(bench["per_class"]) == {"circle", "square", "triangle"}
    manifest = json.loads((recipe / "lens" / "detr-val-mini" / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "coco" and manifest["dataset"]["images"] == 12
    assert manifest["points"]["model.decoder.layers.1"]["layout"]["kinds"] == {"query": 12}
    assert manifest["points"]["model.encoder.layers.0"]["layout"]["grid"] == [2, 2]
    assert json.loads((recipe / "metrics" / "sae_detr-dec5-topk.json").read_text())
    patched = json.loads((recipe / "metrics" / "patch_detr.json").read_text())
    assert "sae-dec5" in json.dumps(patched) and "recovered" in json.dumps(patched)
    assert "Running stage" not in _run(["dvc", "repro"], recipe, env)
