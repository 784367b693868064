"""Every real-model adapter end to end on tiny random-weight models (no downloads): build the public
transformers / torchvision class from a small config, save it, load it through ``load_adapter``, list its
hook points, evaluate it with the shared evaluator and record a two-point Lens on toy-world images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import TEXT, TINY_DEC, TOY_LABELS, VISION, resnet_config, write_tokenizer

from blueglass.data import CocoDataset
from blueglass.errors import ModelError
from blueglass.evaluation.runner import evaluate
from blueglass.features.extract import record_lens
from blueglass.features.lens import Lens
from blueglass.models import load_adapter


@pytest.fixture(scope="module")
def ds(toy_root) -> CocoDataset:
    torch.set_num_threads(1)
    return CocoDataset.load(toy_root / "val")  # 10 images, 1–3 objects each, 64 px


def _save(model, folder, tokenizer=False):
    torch.manual_seed(0)
    model.save_pretrained(str(folder))
    if tokenizer:
        write_tokenizer(folder)
    return folder


def _lens(adapter, ds, points, tmp_path):
    m = record_lens(adapter, ds, points, tmp_path / "lens", batch_size=4, block_images=5, blocks_per_shard=1)
    lens = Lens(tmp_path / "lens")
    assert len(lens.points) == 2, lens.points
    for name in lens.points:
        block = next(lens.blocks(name, lens.shards(name)[:1]))
        assert block.feats.shape[0] == len(block.meta) > 0
        assert set(np.unique(block.meta["image_id"])) <= {r.id for r in ds.images}
    return m


def _layout(manifest, point):
    return manifest["points"][point]["layout"]


def test_detr_family(ds, tmp_path):
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        DetrConfig,
        DetrForObjectDetection,
    )

    builds = {
        "detr": DetrForObjectDetection(
            DetrConfig(backbone_config=resnet_config(["stage4"]), id2label=TOY_LABELS, **TINY_DEC)
        ),
        "conditional": ConditionalDetrForObjectDetection(
            ConditionalDetrConfig(backbone_config=resnet_config(["stage4"]), id2label=TOY_LABELS, **TINY_DEC)
        ),
        "deformable": DeformableDetrForObjectDetection(
            DeformableDetrConfig(
                backbone_config=resnet_config(["stage2", "stage3", "stage4"]),
                id2label=TOY_LABELS,
                num_feature_levels=3,
                encoder_n_points=2,
                decoder_n_points=2,
                **TINY_DEC,
            )
        ),
    }
    for name, model in builds.items():
        folder = _save(model, tmp_path / name)
        adapter = load_adapter(folder, options={"image_size": 64, "score_threshold": 0.0})
        assert type(adapter).__name__ == "DetrAdapter" and adapter.task == "detection"
        names = [p.name for p in adapter.hook_points()]
        assert "model.decoder.layers.1" in names and adapter.aliases()["dec.1"] == "model.decoder.layers.1"
        m = evaluate(adapter, ds, batch_size=4)
        assert 0.0 <= m["AP50"] <= 1.0 and set(m["per_class"]) == {"circle", "square", "triangle"}
        man = _lens(adapter, ds, ["dec.0", "dec.1"], tmp_path / f"{name}-lens")
        lay = _layout(man, "model.decoder.layers.1")
        assert lay["tokens_per_image"] == 9 and lay["kinds"] == {"query": 9}  # 9 queries = 3², still queries
        block = next(Lens(tmp_path / f"{name}-lens" / "lens").blocks("model.decoder.layers.1"))
        assert block.meta["kept"].sum() > 0 and (block.meta["pred_class"] > 0).all()
    # DETR's encoder tokens are the backbone's feature-map grid (64 px / 32 = 2 × 2)
    adapter = load_adapter(tmp_path / "detr", options={"image_size": 64})
    assert adapter.point_layout("model.encoder.layers.0").kind == "patches"
    assert (
        adapter.point_layout("model.encoder.layers.0").rows,
        adapter.point_layout("model.encoder.layers.0").cols,
    ) == (2, 2)


def test_owlvit_and_owlv2(ds, tmp_path):
    from transformers import Owlv2Config, Owlv2ForObjectDetection, OwlViTConfig, OwlViTForObjectDetection

    for name, cls, cfg in [
        ("owlvit", OwlViTForObjectDetection, OwlViTConfig),
        ("owlv2", Owlv2ForObjectDetection, Owlv2Config),
    ]:
        folder = _save(
            cls(cfg(text_config=TEXT, vision_config=VISION, projection_dim=32)), tmp_path / name, True
        )
        adapter = load_adapter(folder, options={"score_threshold": 0.0})
        assert adapter.task == "detection" and adapter.input.fit == (
            "letterbox" if name == "owlv2" else "stretch"
        )
        m = evaluate(adapter, ds, batch_size=4)
        assert 0.0 <= m["AP50"] <= 1.0
        assert adapter.prompts == ["a photo of a circle", "a photo of a square", "a photo of a triangle"]
        man = _lens(adapter, ds, ["resid.1", "class_head"], tmp_path / f"{name}-lens")
        assert _layout(man, f"{name}.vision_model.encoder.layers.1")["kinds"] == {"cls": 1, "patch": 16}
        assert _layout(man, "class_head")["kinds"] == {"patch": 16}
        block = next(Lens(tmp_path / f"{name}-lens" / "lens").blocks("class_head"))
        assert block.meta["kept"].sum() > 0  # each patch token carries its own box prediction
    bigger = load_adapter(tmp_path / "owlv2", options={"image_size": 96})  # 6 × 6 patches, interpolated
    blank = bigger.preprocess([np.zeros((40, 90, 3), np.uint8)] * 2)
    with pytest.raises(ModelError, match="call set_classes"):
        bigger.forward(blank)
    bigger.set_classes(ds.categories)
    out = bigger.forward(blank)
    assert out["boxes"].shape == (2, 36, 4) and bigger.point_layout("class_head").rows == 6


def test_owlvit_vocabulary_is_matched_by_its_text_encoder(ds, tmp_path):
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    folder = _save(
        OwlViTForObjectDetection(OwlViTConfig(text_config=TEXT, vision_config=VISION, projection_dim=32)),
        tmp_path / "o",
        True,
    )
    adapter = load_adapter(
        folder, options={"vocabulary": ["circle", "box", "triangle", "star"], "oov_threshold": 0.99}
    )
    adapter.set_classes(ds.categories)
    # identical texts embed identically: circle/triangle map to their class; box/star are out of vocabulary
    table = adapter.binding.matcher.table(adapter.binding.source, adapter.binding.category_names)
    assert table["circle"] == ["circle"] and table["triangle"] == ["triangle"] and table["star"] == []


def test_grounding_dino(ds, tmp_path):
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection

    cfg = GroundingDinoConfig(
        backbone_config=resnet_config(["stage2", "stage3", "stage4"]),
        text_config=BertConfig(**{**TEXT, "intermediate_size": 32, "max_position_embeddings": 64}),
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
        **TINY_DEC,
    )
    folder = _save(GroundingDinoForObjectDetection(cfg), tmp_path / "gd", True)
    adapter = load_adapter(folder, options={"image_size": 64, "score_threshold": 0.0})
    m = evaluate(adapter, ds, batch_size=4)
    assert 0.0 <= m["AP50"] <= 1.0 and adapter.prompts == ["circle", "square", "triangle"]
    assert adapter._spans == [(1, 2), (3, 4), (5, 6)]  # [CLS] circle . square . triangle . [SEP]
    man = _lens(adapter, ds, ["dec.1", "text.0"], tmp_path)
    assert _layout(man, "model.decoder.layers.1")["kinds"] == {"query": 9}
    assert _layout(man, "model.text_backbone.encoder.layer.0")["kinds"] == {"text": 8}
    too_many = load_adapter(folder, options={"image_size": 64, "vocabulary": ["circle"] * 20})
    with pytest.raises(ModelError, match="at most 32"):
        too_many.set_classes(ds.categories)


def test_clip_and_siglip_zero_shot(ds, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipModel

    proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    for name, model in [
        ("clip", CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))),
        ("siglip", SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))),
    ]:
        folder = _save(model, tmp_path / name, True)
        proc.save_pretrained(str(folder))
        adapter = load_adapter(folder)
        assert adapter.task == "zero_shot"
        m = evaluate(adapter, ds, batch_size=4, prompts={"cat": "a photo of a {category}"})
        assert 0.0 <= m["accuracy"] <= 1.0
        man = _lens(adapter, ds, ["resid.0", "resid.1"], tmp_path / name)
        kinds = _layout(man, "vision_model.encoder.layers.1")["kinds"]
        assert kinds == ({"patch": 16} if name == "siglip" else {"cls": 1, "patch": 16})


def test_vit_classifier_and_backbones(ds, tmp_path):
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification, ViTModel

    builds = {
        "vit-cls": ViTForImageClassification(
            ViTConfig(**VISION, id2label={0: "Circle", 1: "square", 2: "triangle", 3: "dog"})
        ),
        "vit": ViTModel(ViTConfig(**VISION), add_pooling_layer=False),
        "dinov2": Dinov2Model(
            Dinov2Config(**{k: v for k, v in VISION.items() if k != "intermediate_size"}, mlp_ratio=2)
        ),
    }
    for name, model in builds.items():
        adapter = load_adapter(_save(model, tmp_path / name), options={"image_size": 64})
        assert adapter.task == ("classification" if name == "vit-cls" else "embedding")
        m = evaluate(adapter, ds, batch_size=4)
        assert 0.0 <= m["accuracy"] <= 1.0
        if name == "vit-cls":  # 'dog' has no dataset class; 'Circle' matches 'circle'
            assert adapter.binding.matcher.out_of_vocabulary.tolist() == [3]
        man = _lens(adapter, ds, ["resid.0", "resid.1"], tmp_path / name)
        (point,) = [p for p in man["points"] if p.endswith(".1")]
        assert _layout(man, point)["kinds"] == {"cls": 1, "patch": 16} and _layout(man, point)["grid"] == [
            4,
            4,
        ]


def test_torchvision_classifiers(ds, tmp_path):
    import torchvision

    from blueglass.models.tvision import save_torchvision

    classes = ["circle", "square", "triangle"]
    builds = {
        "resnet18": (torchvision.models.resnet18(weights=None, num_classes=3), {}),
        "VisionTransformer": (
            torchvision.models.VisionTransformer(
                image_size=64,
                patch_size=16,
                num_layers=2,
                num_heads=2,
                hidden_dim=32,
                mlp_dim=64,
                num_classes=3,
            ),
            {
                "image_size": 64,
                "patch_size": 16,
                "num_layers": 2,
                "num_heads": 2,
                "hidden_dim": 32,
                "mlp_dim": 64,
            },
        ),
    }
    for arch, (model, kw) in builds.items():
        folder = save_torchvision(model, tmp_path / arch, arch, classes, kw)
        adapter = load_adapter(folder, options={"image_size": 64})
        assert adapter.task == "classification"
        m = evaluate(adapter, ds, batch_size=4)
        assert 0.0 <= m["accuracy"] <= 1.0
        points = ["stage.3", "stage.4"] if arch == "resnet18" else ["resid.0", "resid.1"]
        man = _lens(adapter, ds, points, tmp_path / arch)
        if arch == "resnet18":
            assert _layout(man, "layer4")["grid"] == [2, 2] and _layout(man, "layer3")["grid"] == [4, 4]
        else:
            assert _layout(man, "encoder.layers.encoder_layer_1")["kinds"] == {"cls": 1, "patch": 16}


@pytest.mark.parametrize(
    "arch", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn"]
)
def test_torchvision_detectors(ds, tmp_path, arch):
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=4)
    weights = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), weights)
    from blueglass.models.tvision import TorchvisionAdapter

    adapter = TorchvisionAdapter(
        None,
        options={"image_size": 64, "score_threshold": 0.0},
        arch=arch,
        weights=weights,
        classes=["__background__", "circle", "square", "triangle"],
    )
    assert adapter.task == "detection"
    m = evaluate(adapter, ds, batch_size=4)
    assert 0.0 <= m["AP50"] <= 1.0
    names = [p.name for p in adapter.hook_points()]
    assert not any(n.startswith("roi_heads.box_head") for n in names)  # per-region, not per image
    man = _lens(adapter, ds, _two_maps(names), tmp_path)
    for p in man["points"].values():
        assert p["layout"]["kinds"] == {"patch": p["layout"]["tokens_per_image"]}


def _two_maps(names):
    maps = [n for n in names if n.startswith("backbone.body.") and n.count(".") == 2]
    return maps[-2:]


def test_unsupported_and_missing_models(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_adapter(tmp_path / "nowhere")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"], "model_type": "bert"})
    )
    with pytest.raises(ModelError, match="architectures: .*DetrForObjectDetection"):
        load_adapter(tmp_path / "m")


def test_models_from_params_and_points_cli(tmp_path, toy_root):
    """``kind: hf`` / ``kind: torchvision`` in params.yaml: resolved by path, missing weights are one line."""
    import torchvision
    import yaml
    from tiny_models import tiny_detr
    from typer.testing import CliRunner

    from blueglass.cli import app
    from blueglass.config import load_params
    from blueglass.models import model_location, open_model

    tiny_detr(tmp_path / "weights" / "detr")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r18.pth")
    params = {
        "dataset": {
            "kind": "coco",
            "name": "toy",
            "splits": {
                "val": {
                    "images": str(toy_root / "val" / "images"),
                    "annotations": str(toy_root / "val" / "annotations.json"),
                }
            },
        },
        "models": {
            "detr": {"kind": "hf", "path": "weights/detr", "image_size": 64},
            "r18": {
                "kind": "torchvision",
                "arch": "resnet18",
                "weights": "r18.pth",
                "classes": ["circle", "square", "triangle"],
                "image_size": 64,
            },
            "gone": {"kind": "hf", "path": "weights/missing"},
        },
        "benchmark": {"runs": [{"model": "detr", "split": "val"}]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_params(tmp_path / "params.yaml")
    assert open_model(p, tmp_path, "detr").image_size == 64
    r18 = open_model(p, tmp_path, "r18")
    assert r18.task == "classification" and len(r18.weights_sha256) == 64
    with pytest.raises(
        ModelError, match=r"weights/missing: models.gone expects the model's save_pretrained folder"
    ):
        model_location(p, tmp_path, "gone")
    res = CliRunner().invoke(
        app, ["points", "--model", "r18", "--params", str(tmp_path / "params.yaml"), "-f", "layer*"]
    )
    assert res.exit_code == 0 and "layer4" in res.output
    res = CliRunner().invoke(
        app, ["points", "--model", str(tmp_path / "weights" / "detr"), "-f", "model.decoder.layers.*"]
    )
    assert res.exit_code == 0 and "model.decoder.layers.1" in res.output
