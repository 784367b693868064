"""Open-vocabulary detectors with one box per image patch: ``OwlViTForObjectDetection`` and
``Owlv2ForObjectDetection``.

Class prompts come from the dataset's category names through ``prompt_template`` (default
``a photo of a {category}``) or from ``vocabulary`` (matched to the dataset's classes by the model's own
text embeddings). The prompts are encoded once (``set_prompts``); ``forward`` runs the public
``image_embedder`` → ``class_predictor`` / ``box_predictor`` path, so hooks see the vision tower and heads.
Images are stretched to the square input (OWL-ViT's processor) or letterboxed (OWLv2's).

Hook points: vision encoder layers → CLS + patch grid (``resid.N``); ``layer_norm``, ``class_head``,
``box_head`` → one token per patch, each the token that predicts that patch's box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from blueglass.errors import ModelError
from blueglass.models.hf import HFDetector, load_tokenizer


class OwlAdapter(HFDetector):
    architectures = ("OwlViTForObjectDetection", "Owlv2ForObjectDetection")
    alias_lists = {
        "resid": ("owlvit.vision_model.encoder.layers", "owlv2.vision_model.encoder.layers"),
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokenizer = load_tokenizer(self.folder)
        self._query_embeds: torch.Tensor | None = None

    @property
    def backbone(self):
        return getattr(self.module, "owlv2", None) or self.module.owlvit

    @property
    def default_fit(self):  # type: ignore[override]
        return "letterbox" if type(self.module).__name__.startswith("Owlv2") else "stretch"

    def bind_classes(self, categories: Mapping[int, str]):
        return self.bind_prompts(categories, "a photo of a {category}")

    @torch.no_grad()
    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        max_len = self.module.config.text_config.max_position_embeddings
        tok = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        out = self.backbone.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return out.pooler_output

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        e = self._text_features(texts).float()
        return (e / e.norm(dim=-1, keepdim=True).clamp_min(1e-8)).cpu().numpy()

    def set_prompts(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)
        self._query_embeds = self._text_features(self.prompts)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # another input size than the checkpoint's: interpolate position embeddings and box biases
        interp = self.image_size != self.module.config.vision_config.image_size
        feature_map, _ = self.module.image_embedder(
            pixel_values=batch["pixel_values"], interpolate_pos_encoding=interp
        )
        b, h, w, d = feature_map.shape
        feats = feature_map.reshape(b, h * w, d)
        if self._query_embeds is None:
            raise ModelError(
                "a text-prompted detector needs its classes: call set_classes(dataset.categories)"
            )
        queries = self._query_embeds[None].expand(b, -1, -1)
        logits, _ = self.module.class_predictor(feats, queries, None)
        boxes = self.module.box_predictor(feats, feature_map, interpolate_pos_encoding=interp)
        return {"logits": logits, "boxes": boxes}

    def _probs_boxes(self, outputs):
        probs = self.binding.map_probs(outputs["logits"].float().sigmoid())
        return probs, box_convert(outputs["boxes"].float(), "cxcywh", "xyxy")

    def reinitialize(self, seed: int) -> None:
        super().reinitialize(seed)
        if self._categories is None and getattr(self, "prompts", None):
            self.set_prompts(self.prompts)
