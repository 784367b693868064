"""Zero-shot classification with any ``transformers.CLIPModel`` or ``SiglipModel`` folder (the embedded
VLM or a real CLIP / SigLIP).

The folder is what ``save_pretrained`` writes: ``config.json`` + ``model.safetensors``, with the
tokenizer and image processor saved beside them (as real checkpoints ship them). ``set_prompts`` encodes
the class prompts once; ``forward`` runs the image tower (the part hooks see) and ``postprocess`` returns
``[B, prompts]`` logits (SigLIP: with its logit bias; its text tower is run with ``max_length`` padding,
as SigLIP was trained). CLIP's vision layers are CLS + patches, SigLIP's patches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from blueglass.errors import ModelError
from blueglass.models.base import HookPoint, trace_hook_points, weights_sha256
from blueglass.models.common import require_folder
from blueglass.models.hf import model_class


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class ClipAdapter:
    task = "zero_shot"

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", options=None):
        self.folder = require_folder(
            folder, "save_pretrained folder (config.json, weights, tokenizer, processor)"
        )
        self.device = torch.device(device)
        cls = model_class(self.folder, ("CLIPModel", "SiglipModel"))
        try:
            self.module: CLIPModel = cls.from_pretrained(str(self.folder), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{self.folder}: cannot load a {cls.__name__} folder ({str(exc).splitlines()[0]})"
            ) from None
        self.siglip = cls.__name__ == "SiglipModel"
        self.module.eval().to(self.device)
        self.name = getattr(self.module.config, "blueglass_name", None) or self.folder.name
        self.image_size = int(self.module.config.vision_config.image_size)
        self.prompts: list[str] = []
        self._text_embeds: torch.Tensor | None = None

    @property
    def weights_sha256(self) -> str:
        return weights_sha256(self.folder)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``[P, D]``."""
        pad = {"padding": True}
        if self.siglip:
            pad = {"padding": "max_length", "truncation": True, "max_length": self.text_length}
        tok = self.tokenizer(list(prompts), return_tensors="pt", **pad).to(self.device)
        mask = None if self.siglip else tok["attention_mask"]  # SigLIP's text tower sees its padding
        out = self.module.get_text_features(input_ids=tok["input_ids"], attention_mask=mask)
        return _l2(out.pooler_output)

    def set_prompts(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)
        self._text_embeds = self.encode_text(self.prompts)

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        px = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return {"pixel_values": px.to(self.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _l2(self.module.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)

    def postprocess(self, outputs: torch.Tensor, sizes: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        if self._text_embeds is None:
            raise ModelError("zero-shot model has no prompts: call set_prompts() first")
        scale = self.module.logit_scale.exp()
        bias = self.module.logit_bias if self.siglip else 0.0
        return (scale * outputs @ self._text_embeds.T + bias).float().cpu()

    @property
    def text_length(self) -> int:
        return int(self.module.config.text_config.max_position_embeddings)

    @property
    def grid(self) -> int:
        cfg = self.module.config.vision_config
        return cfg.image_size // cfg.patch_size

    def aliases(self) -> dict[str, str]:
        """Friendly names: ``resid.N`` = the output of vision block N; ``image_embeds`` = the projection."""
        n = self.module.config.vision_config.num_hidden_layers
        return {f"resid.{i}": f"vision_model.encoder.layers.{i}" for i in range(n)} | {
            "image_embeds": "visual_projection"
        }

    def reinitialize(self, seed: int) -> None:
        """Replace the weights by a fresh random initialisation (the control for probes and SAEs)."""
        torch.manual_seed(seed)
        self.module = type(self.module)(self.module.config).eval().to(self.device)
        self.name = f"{self.name}-random"
        self.control_seed = seed
        if self.prompts:
            self.set_prompts(self.prompts)

    def hook_points(self) -> list[HookPoint]:
        blank = [np.zeros((self.image_size, self.image_size, 3), np.uint8)]
        return trace_hook_points(self.module, lambda: self.forward(self.preprocess(blank)))
