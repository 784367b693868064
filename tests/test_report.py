"""The static report: sections from hand-made inputs, "not run yet" notes, images on disk, the CLI, and
the page as headless Chromium renders it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOKE_PARAMS
from PIL import Image

MAGENTA = (255, 0, 255)
SECTIONS = ["benchmark", "probes", "saes", "patching", "latents", "lineage"]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "section":
            self.sections.append(a["id"])
        assert tag not in ("script", "link", "iframe"), f"<{tag}> in an offline static page"


def _parse(index: Path) -> tuple[_Page, str]:
    text = index.read_text()
    p = _Page()
    p.feed(text)
    return p, text


def _png(path: Path, colour=MAGENTA, size=(48, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _intervention(kind, recovered, **kw):
    return {
        "kind": kind,
        "sites": ["vit.layers.3"],
        "metric_clean": 0.82,
        "metric_patched": 0.1 + recovered * 0.72,
        "metric_zero_ablation": 0.1,
        "metric_mean_ablation": 0.3,
        "recovered": recovered,
        "recovered_vs_mean": (recovered * 0.72 - 0.2) / 0.52,
        **kw,
    }


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder with every report input, written by hand to the stages' contracts; no MLflow DB."""
    monkeypatch.setenv("BLUEGLASS_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    m = tmp_path / "metrics"
    _json(
        m / "benchmark.json",
        {
            "toy-detector@test": {
                "task": "detection", "images": 50, "AP": 0.58, "AP50": 0.81, "AP75": 0.69, "APs": 0.58,
                "APm": None, "APl": None, "AR100": 0.7, "per_class": {"circle": 0.59, "square": 0.55},
            },
            "toy-vlm@test_single": {
                "task": "zero_shot", "images": 60, "accuracy": 0.94,
                "color": {"accuracy": 1.0, "classes": 4}, "shape": {"accuracy": 0.915, "classes": 3},
            },
            "clip@val": {"task": "classification", "images": 10, "accuracy": 0.5, "top5_accuracy": 0.9},
        },
    )  # fmt: skip
    points = ["vit.layers.0", "vit.layers.1", "head"]
    (tmp_path / "plots").mkdir()
    with (tmp_path / "plots" / "probe_toy-detector.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["depth", "point", "color", "color_control", "pred_box", "pred_box_control", "tp"])
        for d, p in enumerate(points):
            w.writerow([d, p, 0.9 + d / 50, 0.95, 0.3 + d / 5, 0.1, 0.94])
    _json(
        m / "probe_toy-detector.json",
        {
            p: {
                "color": {"accuracy": 0.9, "control_accuracy": 0.95, "learned": False},
                "pred_box": {"r2": 0.3 + d / 5, "control_r2": 0.1, "learned": True},
                "tp": {"accuracy": 0.94},
            }
            for d, p in enumerate(points)
        },
    )
    sae = {"mse": 1.0, "fvu": 0.07, "explained_variance": 0.93, "l0": 16.0, "dead_frac": 0.03,
           "dense_frac": 0.04, "concept_recovery": {"color": 0.9, "shape": 0.7}, "steps": 200}  # fmt: skip
    _json(m / "sae_toy-detector-l3.json", {"topk": sae, "relu": {**sae, "l0": 40.0, "fvu": 0.05}})
    _json(m / "sae_toy-detector-old.json", sae)  # the single-SAE format of earlier runs
    _json(
        m / "patch_toy-detector-l3.json",
        {
            "model": "toy-detector",
            "split": "test",
            "metric": "AP50",
            "clean": {"AP": 0.58, "AP50": 0.82},
            "sites": {"vit.layers.3": {"zero_ablation": {"AP50": 0.1}, "mean_ablation": {"AP50": 0.3}}},
            "interventions": {
                "sae-topk": _intervention(
                    "sae",
                    0.9,
                    registry={
                        "name": "toy-detector+sae-topk@vit.layers.3",
                        "version": "3",
                        "alias": "champion",
                    },
                    uses={"sae": "toy-detector.vit.layers.3.sae-topk/2"},
                ),
                "zero": _intervention("zero", 0.0),
            },
            "joint": _intervention("sae", 0.85),
        },
    )
    lat = tmp_path / "reports" / "latents" / "toy-detector-l3" / "topk"
    _json(
        lat / "latents.json",
        {
            "sae": "toy-detector-l3/topk",
            "point": "vit.layers.3",
            "top_latents": [
                {"latent": 12, "max_activation": 3.1, "concept": "color=red", "concept_auroc": 0.97,
                 "grid": "latent_12.png"},
                {"latent": 7, "max_activation": 2.0, "concept": None, "concept_auroc": None,
                 "grid": "latent_7.png"},
            ],
            "class_heatmap": "class_heatmap.png",
        },
    )  # fmt: skip
    _png(lat / "latent_12.png", size=(160, 160))
    _png(lat / "latent_7.png", colour=(0, 200, 0))
    _png(lat / "class_heatmap.png", colour=(30, 60, 200), size=(120, 60))
    _json(m / "extract_toy-detector-test.json", {"lens": "toy-detector-test", "md5": "d380dc0bf500c3912b158d8ce0a09417",
                                                 "rows": 1945, "images": 50, "points": 6, "bytes": 556748})  # fmt: skip
    return tmp_path


def _build(base: Path, params=None) -> dict:
    from blueglass.stages import report

    return report.run(params, base)


def test_full_report_has_every_section_and_valid_images(project, tiny_params):
    out = _build(project, tiny_params)
    index = project / "reports" / "index.html"
    assert out["index"] == index
    assert all(out["sections"].values()), out["sections"]
    page, text = _parse(index)
    assert page.sections == SECTIONS
    assert "Not run yet" not in text
    assert len(page.imgs) == 3 + 3  # probe curve, SAE scatter, patch bars + two latent grids, one heatmap
    for src in page.imgs:
        assert not src.startswith(("/", "http:", "https:", "file:", "data:")), src
        f = index.parent / src
        assert f.is_file(), src
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
        with Image.open(f) as im:
            im.verify()
    assert "latents/toy-detector-l3/topk/latent_12.png" in page.imgs
    assert sorted(out["figures"]) == sorted(p.name for p in (project / "reports" / "figures").iterdir())
    # the numbers of each section made it into the page
    for needle in (
        "toy-detector@test", "0.810", "toy-vlm@test_single", "top5_accuracy",
        "pred_box", "relu", "recovery: shape", "sae-topk", "joint", "toy-detector+sae-topk@vit.layers.3 v3 @champion", "0.862",
        "color=red (AUROC 0.97)", "d380dc0bf500c3912b158d8ce0a09417", "No MLflow database",
    ):  # fmt: skip
        assert needle in text, needle
    # the single-SAE file of earlier runs is one member named after nothing in params ("sae")
    assert "toy-detector-old</td><td>sae</td>" in text.replace('<td class="l">', "<td>")
    # rebuilding gives the same bytes (figures carry no timestamps)
    before = {p.name: p.read_bytes() for p in (project / "reports" / "figures").iterdir()}
    _build(project, tiny_params)
    assert before == {p.name: p.read_bytes() for p in (project / "reports" / "figures").iterdir()}
    assert index.read_text() == text


def test_missing_inputs_say_not_run_yet(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUEGLASS_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = _build(tmp_path)
    assert out["sections"] == {s: s == "lineage" for s in SECTIONS}
    page, text = _parse(tmp_path / "reports" / "index.html")
    assert page.sections == SECTIONS and page.imgs == []
    assert text.count("Not run yet") == 6  # five sections + the Lens table of the lineage
    assert "No MLflow database" in text
    # broken and partial inputs: error notes, never an exception
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "benchmark.json").write_text("{not json")
    (tmp_path / "metrics" / "sae_bad.json").write_text("[1, 2")
    _json(tmp_path / "metrics" / "probe_only-json.json", {"head": {"tp": {"accuracy": 0.9}}})
    lat = tmp_path / "reports" / "latents" / "run" / "m"
    _json(lat / "latents.json", {"sae": "run/m", "top_latents": [{"latent": 1, "grid": "../../../../etc/passwd"},
                                                                 {"latent": 2, "grid": "gone.png"}]})  # fmt: skip
    out = _build(tmp_path)
    page, text = _parse(tmp_path / "reports" / "index.html")
    assert "Could not read metrics/benchmark.json" in text and "Could not read metrics/sae_bad.json" in text
    assert "Not run yet: the per-layer curve (no plots/probe_only-json.csv)" in text
    assert "Missing or invalid image(s)" in text and "gone.png" in text
    assert page.imgs == []


def test_registry_versions_in_lineage(project, mlflow_project):
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model("toy-detector")
    mv = client.create_model_version("toy-detector", source=str(project / "models" / "toy-detector"))
    for k, v in {"headline_metric": "AP50", "metric.AP50": "0.81", "metric.test.AP50": "0.79"}.items():
        client.set_model_version_tag("toy-detector", mv.version, k, v)
    client.set_registered_model_alias("toy-detector", "champion", mv.version)
    _build(project)
    text = (project / "reports" / "index.html").read_text()
    assert "No MLflow database" not in text
    assert "<td>1</td><td>champion</td><td>AP50</td><td>AP50 0.810, test.AP50 0.790</td>" in text


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "blueglass.cli", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_cli_report(project):
    shutil.copy(SMOKE_PARAMS, project / "params.yaml")
    out = _cli("report", "--params", str(project / "params.yaml"), env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(project / "reports" / "index.html")
    (project / "bad.yaml").write_text("dataset: {}\n")
    bad = _cli("report", "--params", str(project / "bad.yaml"), env=dict(os.environ))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


def test_report_renders_in_headless_chromium(project, tmp_path):
    from blueglass.report.browser import CANDIDATES, find_browser, screenshot

    if find_browser() is None:
        msg = f"no headless Chromium on PATH (tried {', '.join(CANDIDATES)}); `make test` installs it as root"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    out = _build(project)
    png = screenshot(out["index"], tmp_path / "shot.png", width=1280, height=6000)
    rgb = np.asarray(Image.open(png).convert("RGB"))
    assert rgb.shape == (6000, 1280, 3)
    assert rgb.std() > 10  # not a blank page
    colours = np.unique((rgb.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)).ravel())
    assert len(colours) > 200  # text, tables, anti-aliased plots
    # the latent grid PNG (flat magenta, 160 px) was loaded by the browser from its relative path
    assert (rgb == MAGENTA).all(-1).sum() >= 150 * 150 * 0.9
