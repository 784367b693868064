import os
import subprocess
import sys

from conftest import REPO


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "blueglass.cli", *args], capture_output=True, text=True, timeout=300, **kw
    )


def test_help_imports_nothing_heavy():
    code = "import sys, blueglass.cli; heavy = {'torch', 'mlflow', 'transformers', 'dvc'} & set(sys.modules); print(sorted(heavy))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]"
    out = _cli("--help")
    assert out.returncode == 0
    for cmd in ("prepare", "train-model", "benchmark", "points", "registry"):
        assert cmd in out.stdout


def test_points_lists_hook_points(tiny_detector):
    out = _cli("points", "--model", str(tiny_detector), "--filter", "vit.layers.*")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["vit.layers.0", "ViTLayer"]
    bad = _cli("points", "--model", "no-such-model", cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no-such-model: neither a model folder")


def test_registry_commands(mlflow_project):
    env = dict(os.environ)
    out = _cli("registry", "list", env=env)
    assert out.returncode == 0 and "the registry is empty" in out.stdout
    bad = _cli("registry", "promote", "ghost", "1", "--alias", "champion", env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: registry: no version 1 of model 'ghost'"
