"""Training the embedded detector: focal loss on per-patch classes, L1 + GIoU on boxes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss
from transformers import ViTConfig

from blueglass.config import DetectorModelParams
from blueglass.models.detector import ToyDetector, assign_targets, to_pixel_tensor
from blueglass.training.common import SplitArrays, make_optimizer, run_steps

MEAN = STD = (0.5, 0.5, 0.5)


def build_detector(p: DetectorModelParams, image_size: int, num_classes: int) -> ToyDetector:
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=p.vit.patch_size,
        num_channels=3,
        hidden_size=p.vit.hidden_size,
        num_hidden_layers=p.vit.layers,
        num_attention_heads=p.vit.heads,
        intermediate_size=p.vit.mlp_dim,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ToyDetector(cfg, num_classes)


def train_detector(
    p: DetectorModelParams,
    data: SplitArrays,
    *,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[ToyDetector, dict[str, float]]:
    torch.manual_seed(p.train.seed)
    rng = np.random.default_rng(p.train.seed)
    n, size = data.images.shape[0], data.images.shape[1]
    model = build_detector(p, size, len(data.category_ids))
    model.train()
    opt, sched = make_optimizer(model, p.train)
    bs = p.train.batch_size

    def step(_i: int) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, n, size=bs)
        flip = rng.random(bs) < 0.5
        imgs = data.images[idx].copy()
        imgs[flip] = imgs[flip, :, ::-1]
        boxes = []
        for j, k in enumerate(idx):
            b = data.boxes_xyxy[k].copy()
            if flip[j]:
                b[:, [0, 2]] = size - b[:, [2, 0]]
            boxes.append(b)
        cls_t, box_t, pos = assign_targets(boxes, [data.labels[k] for k in idx], model.grid, size)
        out = model(to_pixel_tensor(imgs, MEAN, STD))
        npos = max(1, int(pos.sum()))
        onehot = F.one_hot(cls_t.clamp(min=0), model.num_classes).float() * pos[..., None]
        loss_cls = sigmoid_focal_loss(out["logits"], onehot, reduction="sum") / npos
        pred, tgt = out["boxes"][pos], box_t[pos]
        loss_l1 = F.l1_loss(pred, tgt, reduction="sum") / npos
        loss_giou = (
            generalized_box_iou_loss(
                box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
            )
            / npos
        )
        loss = loss_cls + 5.0 * loss_l1 + 2.0 * loss_giou
        return {
            "loss": loss,
            "loss_cls": loss_cls.detach(),
            "loss_l1": loss_l1.detach(),
            "loss_giou": loss_giou.detach(),
        }

    history = run_steps(p.train, step, opt, sched, list(model.parameters()), progress=progress)
    model.eval()
    return model, history
