"""The embedded detector: ``transformers.ViTModel`` over image patches with a per-patch detection head.

Each patch token predicts class scores (sigmoid, one per category) and a box (centre offset from the
patch centre and log width/height, in patch units). Decoding keeps the best class per token, drops scores
under a threshold and runs class-wise NMS. Because the backbone is a stock ``ViTModel``, its hook points
(``vit.layers.N`` …) look like a real ViT's.

On disk (``save_detector``): ``config.json`` (``model_type: blueglass-toy-detector``, the ViT config,
class names, preprocessing and decoding settings) and ``model.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.ops import batched_nms, box_convert
from transformers import ViTConfig, ViTModel

from blueglass.errors import ModelError
from blueglass.models.base import Detections, HookPoint, trace_hook_points, weights_sha256

MODEL_TYPE = "blueglass-toy-detector"
_MAX_LOG_SIZE = 4.0


class ToyDetector(nn.Module):
    def __init__(self, vit_config: ViTConfig, num_classes: int):
        super().__init__()
        self.vit_config = vit_config
        self.num_classes = num_classes
        self.grid = vit_config.image_size // vit_config.patch_size
        d = vit_config.hidden_size
        self.vit = ViTModel(vit_config, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, num_classes + 4))
        # Focal-loss prior: start with every class at ~1 % so early training is not swamped by background.
        nn.init.constant_(self.head[-1].bias[:num_classes], -4.6)
        nn.init.zeros_(self.head[-1].bias[num_classes:])
        ys, xs = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        centres = torch.stack([xs.flatten(), ys.flatten()], -1).float() + 0.5  # patch units
        self.register_buffer("centres", centres, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS: [B, T, d]
        out = self.head(tokens)
        logits, raw = out[..., : self.num_classes], out[..., self.num_classes :]
        cxcy = (self.centres + raw[..., :2]) / self.grid
        wh = torch.exp(raw[..., 2:].clamp(-_MAX_LOG_SIZE, _MAX_LOG_SIZE)) / self.grid
        return {"logits": logits, "boxes": torch.cat([cxcy, wh], -1)}  # boxes: normalised cxcywh


def assign_targets(
    boxes_xyxy: Sequence[np.ndarray], labels: Sequence[np.ndarray], grid: int, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense per-patch targets for a batch.

    A patch is positive for an object when it contains the object's centre or its centre lies in the
    central half of the object's box; ties go to the smaller object. Returns ``cls_BTC``-style one-hot class
    targets ``[B, T]`` (category index, -1 = background) and normalised cxcywh box targets ``[B, T, 4]`` and a
    positive mask ``[B, T]``.
    """
    b = len(boxes_xyxy)
    t = grid * grid
    cls = torch.full((b, t), -1, dtype=torch.long)
    box_t = torch.zeros((b, t, 4))
    cell = image_size / grid
    pc = (np.arange(grid) + 0.5) * cell
    for i, (bx, lb) in enumerate(zip(boxes_xyxy, labels, strict=True)):
        if len(bx) == 0:
            continue
        best_area = np.full(t, np.inf)
        for (x0, y0, x1, y1), c in zip(bx, lb, strict=True):
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            in_x = np.abs(pc - cx) <= w / 4
            in_y = np.abs(pc - cy) <= h / 4
            mask = np.outer(in_y, in_x)
            mask[min(int(cy // cell), grid - 1), min(int(cx // cell), grid - 1)] = True
            flat = mask.flatten() & (w * h < best_area)
            best_area[flat] = w * h
            cls[i, torch.from_numpy(flat)] = int(c)
            box_t[i, torch.from_numpy(flat)] = torch.tensor(
                [cx / image_size, cy / image_size, w / image_size, h / image_size]
            )
    return cls, box_t, cls >= 0


def save_detector(model: ToyDetector, folder: Path, classes: Sequence[str], extra: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_type": MODEL_TYPE,
        "architectures": ["ToyDetector"],
        "classes": list(classes),
        "vit": model.vit_config.to_dict(),
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        **extra,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def to_pixel_tensor(images: Sequence[np.ndarray] | np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """``[B, H, W, 3]`` uint8 → normalised ``[B, 3, H, W]`` float32."""
    arr = torch.from_numpy(
        np.ascontiguousarray(np.stack(list(images)) if not isinstance(images, np.ndarray) else images)
    )
    x = arr.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


class DetectorAdapter:
    """ModelAdapter for folders written by :func:`save_detector`."""

    task = "detection"

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        try:
            cfg = json.loads((self.folder / "config.json").read_text())
            vit_cfg = ViTConfig.from_dict(cfg["vit"])
            self.classes: list[str] = list(cfg["classes"])
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise ModelError(f"{self.folder}: not a toy-detector folder ({exc})") from None
        self.config = cfg
        self.name = cfg.get("name", self.folder.name)
        self.image_size = vit_cfg.image_size
        self.device = torch.device(device)
        self.module = ToyDetector(vit_cfg, len(self.classes))
        state = load_file(str(self.folder / "model.safetensors"))
        self.module.load_state_dict(state)
        self.module.eval().to(self.device)
        self.category_ids: list[int] = list(cfg.get("category_ids", range(1, len(self.classes) + 1)))
        self.score_threshold = float(cfg.get("score_threshold", 0.01))
        self.nms_iou = float(cfg.get("nms_iou", 0.5))
        self.max_detections = int(cfg.get("max_detections", 100))

    @property
    def weights_sha256(self) -> str:
        return weights_sha256(self.folder)

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        bad = [im.shape for im in images if im.shape[:2] != (self.image_size, self.image_size)]
        if bad:
            # Resize rather than fail: real datasets come in any size; boxes are rescaled in postprocess.
            import torch.nn.functional as F

            x = [
                F.interpolate(
                    to_pixel_tensor([im], self.config["image_mean"], self.config["image_std"]),
                    size=(self.image_size, self.image_size),
                    mode="bilinear",
                    align_corners=False,
                )
                for im in images
            ]
            return {"pixel_values": torch.cat(x).to(self.device)}
        px = to_pixel_tensor(images, self.config["image_mean"], self.config["image_std"])
        return {"pixel_values": px.to(self.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.module(batch["pixel_values"])

    def postprocess(
        self, outputs: dict[str, torch.Tensor], sizes: Sequence[tuple[int, int]]
    ) -> list[Detections]:
        probs = outputs["logits"].sigmoid().float().cpu()
        boxes = box_convert(outputs["boxes"].float().cpu(), "cxcywh", "xyxy")
        results = []
        for i, (h, w) in enumerate(sizes):
            score, label = probs[i].max(-1)
            keep = torch.nonzero(score > self.score_threshold).flatten()
            bx = boxes[i, keep] * torch.tensor([w, h, w, h], dtype=torch.float32)
            bx[:, 0::2] = bx[:, 0::2].clamp(0, w)
            bx[:, 1::2] = bx[:, 1::2].clamp(0, h)
            k = batched_nms(bx, score[keep], label[keep], self.nms_iou)[: self.max_detections]
            cat_ids = torch.tensor(self.category_ids)[label[keep][k]]
            results.append(
                Detections(
                    boxes_xyxy=bx[k].numpy().astype(np.float32),
                    scores=score[keep][k].numpy().astype(np.float32),
                    labels=cat_ids.numpy().astype(np.int64),
                    token_ids=keep[k].numpy().astype(np.int64),
                )
            )
        return results

    @property
    def grid(self) -> int:
        return self.module.grid

    def aliases(self) -> dict[str, str]:
        """Friendly names: ``resid.N`` = the output of ViT block N."""
        n = self.module.vit_config.num_hidden_layers
        return {f"resid.{i}": f"vit.layers.{i}" for i in range(n)} | {"resid.final": "vit.layernorm"}

    def token_predictions(self, outputs: dict[str, torch.Tensor], detections: Sequence[Detections], sizes):
        """Every patch token's own prediction (best class, its score, its box) and whether it was kept."""
        from blueglass.features.align import TokenPredictions

        probs = outputs["logits"].sigmoid().float().cpu()
        boxes = box_convert(outputs["boxes"].float().cpu(), "cxcywh", "xyxy")
        out = []
        for i, (h, w) in enumerate(sizes):
            score, label = probs[i].max(-1)
            kept = np.zeros(len(score), bool)
            kept[detections[i].token_ids] = True
            out.append(
                TokenPredictions(
                    boxes_xyxy=(boxes[i] * torch.tensor([w, h, w, h])).numpy(),
                    scores=score.numpy(),
                    labels=np.asarray(self.category_ids)[label.numpy()],
                    kept=kept,
                )
            )
        return out

    def reinitialize(self, seed: int) -> None:
        """Replace the weights by a fresh random initialisation (the control for probes and SAEs)."""
        torch.manual_seed(seed)
        self.module = ToyDetector(self.module.vit_config, len(self.classes)).eval().to(self.device)
        self.name = f"{self.name}-random"
        self.control_seed = seed

    def hook_points(self) -> list[HookPoint]:
        blank = [np.zeros((self.image_size, self.image_size, 3), np.uint8)]
        return trace_hook_points(self.module, lambda: self.forward(self.preprocess(blank)))
