"""DETR-family detectors: ``DetrForObjectDetection``, ``ConditionalDetrForObjectDetection``,
``DeformableDetrForObjectDetection`` (one code path: they share outputs — ``logits`` per query and
normalised cxcywh ``pred_boxes``).

DETR scores classes with a softmax over ``num_labels + 1`` (the last is "no object"); Conditional and
Deformable DETR use a sigmoid per class — told apart by the width of ``logits``. The model's ``id2label``
names are matched to the dataset's categories (exact names first, see label_matching). Images are
letterboxed into a square of ``image_size`` (default: the saved processor's ``shortest_edge``, else 800),
so the decoder's query tokens and the encoder's feature-map tokens have one layout for the whole run.
Set prediction needs no NMS (``nms_iou`` defaults to off).

Hook points with declared layouts: decoder layers and the heads → one token per object query
(``dec.N`` aliases); DETR's encoder layers → the backbone's feature-map grid (``enc.N``; Deformable
DETR's multi-scale encoder tokens are ``other``); backbone stages → their own grids.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchvision.ops import box_convert

from blueglass.models.base import TokenLayout
from blueglass.models.common import ClassBinding
from blueglass.models.hf import DECODER_QUERIES, SetDetector


class DetrAdapter(SetDetector):
    architectures = (
        "DetrForObjectDetection",
        "ConditionalDetrForObjectDetection",
        "DeformableDetrForObjectDetection",
    )
    layout_rules = DECODER_QUERIES + (
        ("class_labels_classifier", "queries"),
        ("class_embed.*", "queries"),
        ("bbox_predictor", "queries"),
        ("bbox_embed.*", "queries"),
        ("model.encoder.layers.*", "encoder"),
        ("model.encoder", "encoder"),
    )
    alias_lists = {"dec": ("model.decoder.layers",), "enc": ("model.encoder.layers",)}

    def bind_classes(self, categories: Mapping[int, str]) -> ClassBinding:
        id2label = self.module.config.id2label
        labels = [str(id2label.get(i, id2label.get(str(i), f"class {i}"))) for i in range(len(id2label))]
        return ClassBinding.bind(labels, categories, self.options)

    def make_layout(self, kind, name, shape):
        if kind == "encoder":
            shapes = {p.name: p.shape for p in self.hook_points()}
            proj = shapes.get("model.input_projection")
            if proj is not None and shape is not None and len(proj) == 3 and shape[0] == proj[1] * proj[2]:
                return TokenLayout("patches", proj[1], proj[2], fit=self.input.fit)
            return TokenLayout("other")
        return super().make_layout(kind, name, shape)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.module(pixel_values=batch["pixel_values"])

    def _probs_boxes(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        logits = outputs.logits.float()
        if logits.shape[-1] == self.module.config.num_labels + 1:
            probs = logits.softmax(-1)[..., :-1]
        else:
            probs = logits.sigmoid()
        return self.binding.map_probs(probs), box_convert(outputs.pred_boxes.float(), "cxcywh", "xyxy")
