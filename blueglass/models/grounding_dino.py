"""Grounding DINO (``GroundingDinoForObjectDetection``): a text-conditioned DETR.

The prompt is the class phrases joined the way Grounding DINO was trained (``cat . dog . person .``);
phrases come from the dataset's category names through ``prompt_template`` (default ``{category}``) or
``vocabulary``. A query's score for a class is its highest sigmoid logit over that phrase's text tokens.
The whole prompt must fit the model's ``max_text_len`` (256 for released checkpoints: enough for COCO's
80 classes; longer vocabularies are refused with a clear error rather than split). Images are letterboxed
into a square of ``image_size`` (default: the processor's ``shortest_edge``, else 800); no NMS.

Hook points with declared layouts: decoder layers → one token per query (``dec.N``); text backbone
layers → one token per prompt token (``text.N``); encoder layers (multi-scale image tokens) → ``other``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from blueglass.errors import ModelError
from blueglass.models.hf import DECODER_QUERIES, SetDetector, load_tokenizer


class GroundingDinoAdapter(SetDetector):
    architectures = ("GroundingDinoForObjectDetection",)
    layout_rules = DECODER_QUERIES + (
        ("model.text_backbone.encoder.layer.*", "text"),
        ("model.text_backbone.**", "text"),
        ("model.text_projection", "text"),
        ("model.encoder.layers.*", "other"),
        ("model.encoder", "other"),
    )
    alias_lists = {
        "dec": ("model.decoder.layers",),
        "text": ("model.text_backbone.encoder.layer",),
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokenizer = load_tokenizer(self.folder)
        self._text: dict[str, torch.Tensor] | None = None
        self._spans: list[tuple[int, int]] = []

    def bind_classes(self, categories: Mapping[int, str]):
        return self.bind_prompts(categories, "{category}")

    def _encode(self, phrases: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """``[CLS] p1 . p2 . … [SEP]`` and each phrase's token span."""
        tok = self.tokenizer
        dot = tok(".", add_special_tokens=False)["input_ids"]
        ids = [tok.cls_token_id]
        spans = []
        for p in phrases:
            piece = tok(p, add_special_tokens=False)["input_ids"]
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece + dot
        ids.append(tok.sep_token_id)
        limit = self.module.config.max_text_len
        if len(ids) > limit:
            raise ModelError(
                f"{self.folder}: the prompt of {len(phrases)} classes is {len(ids)} tokens; the model takes "
                f"at most {limit} (use a category subset or a shorter vocabulary)"
            )
        t = torch.tensor([ids])
        enc = {"input_ids": t, "attention_mask": torch.ones_like(t), "token_type_ids": torch.zeros_like(t)}
        return {k: v.to(self.device) for k, v in enc.items()}, spans

    def set_prompts(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)
        self._text, self._spans = self._encode(self.prompts)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Mean text-backbone token state of each text alone (the model's own text encoder)."""
        out = []
        for t in texts:
            enc, spans = self._encode([t])
            hidden = self.module.model.text_backbone(**enc).last_hidden_state[0]
            a, b = spans[0]
            out.append(hidden[a:b].mean(0) if b > a else hidden.mean(0))
        e = torch.stack(out).float()
        return (e / e.norm(dim=-1, keepdim=True).clamp_min(1e-8)).cpu().numpy()

    def forward(self, batch: dict[str, torch.Tensor]):
        if self._text is None:
            raise ModelError(
                "a text-prompted detector needs its classes: call set_classes(dataset.categories)"
            )
        b = batch["pixel_values"].shape[0]
        text = {k: v.expand(b, -1) for k, v in self._text.items()}
        return self.module(pixel_values=batch["pixel_values"], **text)

    def _probs_boxes(self, outputs):
        token_probs = outputs.logits.float().sigmoid()  # [B, Q, text tokens]
        probs = torch.stack([token_probs[..., a:b].amax(-1) for a, b in self._spans], -1)
        return self.binding.map_probs(probs), box_convert(outputs.pred_boxes.float(), "cxcywh", "xyxy")
