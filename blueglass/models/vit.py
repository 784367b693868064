"""ViT-family image encoders: ``ViTForImageClassification`` (classification), ``ViTModel`` and
``Dinov2Model`` (backbones: the benchmark scores their CLS embedding by nearest class centroid).

Hook points: the embeddings and every encoder block give CLS + a patch grid (``resid.N`` aliases the
blocks whatever transformers calls their list); the classifier gives one pooled token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from blueglass.models.common import ClassBinding
from blueglass.models.hf import HFAdapter


class VitAdapter(HFAdapter):
    architectures = ("ViTForImageClassification", "ViTModel", "Dinov2Model")
    default_mean = (0.5, 0.5, 0.5)  # ViT's processor; Dinov2 folders ship their own (ImageNet) values
    default_std = (0.5, 0.5, 0.5)
    layout_rules = (("classifier", "pooled"),)
    alias_lists = {"resid": ("vit.layers", "vit.encoder.layer", "layers", "encoder.layer", "encoder.layers")}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.task = "classification" if hasattr(self.module, "classifier") else "embedding"

    def bind_classes(self, categories: Mapping[int, str]) -> ClassBinding:
        if self.task != "classification":
            return ClassBinding.direct(categories)
        id2label = self.module.config.id2label
        labels = [str(id2label[i]) for i in range(len(id2label))]
        return ClassBinding.bind(labels, categories, self.options)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kw = {}
        if self.module.config.model_type == "vit" and self.image_size != self.module.config.image_size:
            kw["interpolate_pos_encoding"] = True  # Dinov2 interpolates by itself
        out = self.module(pixel_values=batch["pixel_values"], **kw)
        return out.logits if self.task == "classification" else out.last_hidden_state[:, 0]

    def postprocess(self, outputs: torch.Tensor, sizes=()) -> torch.Tensor:
        """Classification: ``[B, categories]`` probabilities (dataset classes by id); else CLS embeddings."""
        if self.task == "classification":
            return self.binding.map_probs(outputs.float().softmax(-1))
        return outputs.float().cpu()
