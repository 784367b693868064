"""Training the embedded vision-language model: a small ``transformers.CLIPModel`` on toy-world captions.

Plain CLIP on full-scene captions learns colour in a minute and stays near chance on shape (measured),
and a single caption per image makes nearly every other image in a batch a false negative for short
descriptions. So each step samples a *partial* description per image — one or two of its objects, each
described by a random subset of its concepts ("a photo of a red object", "a circle and a large blue
square") — and, because the toy world knows every scene, the loss knows which images each description is
true of: a multi-positive contrastive loss over the batch's text × image matrix (a SigLIP-style sigmoid
term plus a softmax InfoNCE term that treats every true pair as a positive). Measured on the default
params: sigmoid alone, 600 steps → shape 0.70 zero-shot; with the InfoNCE term, 1000 steps → 0.96.
The text tower only ever sees captions; zero-shot prompts at benchmark time are new sentences built from
the same words.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from blueglass.config import VlmModelParams
from blueglass.models.detector import to_pixel_tensor
from blueglass.training.common import SplitArrays, make_optimizer, run_steps

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # eos id 3 (≠ 2) → CLIP pools at the first <eos>
TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture of {}", "there is {}")
FILLER = ["a", "an", "photo", "image", "picture", "of", "there", "is", "and", "with", "object"]
MEAN = STD = (0.5, 0.5, 0.5)
MAX_TOKENS = 24
NCE_WEIGHT = 0.5


def build_tokenizer(concepts: dict[str, list[str]], categories: Sequence[str]) -> PreTrainedTokenizerFast:
    words = list(dict.fromkeys(FILLER + [w for vals in concepts.values() for w in vals] + list(categories)))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def build_clip(p: VlmModelParams, image_size: int, vocab_size: int) -> CLIPModel:
    cfg = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": p.text.hidden_size,
            "num_hidden_layers": p.text.layers,
            "num_attention_heads": p.text.heads,
            "intermediate_size": p.text.mlp_dim,
            "max_position_embeddings": MAX_TOKENS,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "projection_dim": p.projection_dim,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": p.vision.patch_size,
            "hidden_size": p.vision.hidden_size,
            "num_hidden_layers": p.vision.layers,
            "num_attention_heads": p.vision.heads,
            "intermediate_size": p.vision.mlp_dim,
            "projection_dim": p.projection_dim,
        },
        projection_dim=p.projection_dim,
        logit_scale_init_value=2.3026,  # exp → 10, as in SigLIP
    )
    return CLIPModel(cfg)


def image_processor() -> CLIPImageProcessor:
    """Toy images are already model-sized: rescale and normalise only (the training transform)."""
    return CLIPImageProcessor(
        do_resize=False, do_center_crop=False, image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True
    )


# ---------------------------------------------------------------- captions and their truth
CONCEPT_ORDER = ("size", "color", "shape")


def _encode_objects(
    attrs: list[list[dict[str, str]]], concepts: dict[str, list[str]], max_obj: int
) -> np.ndarray:
    """``[N, max_obj, 3]`` concept indices (size, colour, shape); -1 pads missing objects."""
    out = np.full((len(attrs), max_obj, len(CONCEPT_ORDER)), -1, np.int64)
    for i, objs in enumerate(attrs):
        for j, a in enumerate(objs[:max_obj]):
            out[i, j] = [concepts[c].index(a[c]) for c in CONCEPT_ORDER]
    return out


def sample_descriptions(
    rng: np.random.Generator, objs_BO3: np.ndarray, concepts: dict[str, list[str]]
) -> tuple[list[str], np.ndarray]:
    """One partial description per image: the text and its descriptor ``[B, 2, 3]`` (-1 = any, -2 = unused)."""
    b = objs_BO3.shape[0]
    desc = np.full((b, 2, 3), -2, np.int64)
    texts = []
    for i in range(b):
        present = np.flatnonzero(objs_BO3[i, :, 0] >= 0)
        k = 1 if len(present) == 1 or rng.random() < 0.6 else 2
        chosen = rng.choice(present, size=k, replace=False)
        parts = []
        for slot, j in enumerate(chosen):
            size_i, color_i, shape_i = objs_BO3[i, j]
            use_shape = rng.random() < 0.7
            use_color = rng.random() < (0.6 if use_shape else 1.0)
            use_size = rng.random() < 0.3
            d = [size_i if use_size else -1, color_i if use_color else -1, shape_i if use_shape else -1]
            desc[i, slot] = d
            words = []
            if use_size:
                words.append(concepts["size"][size_i])
            if use_color:
                words.append(concepts["color"][color_i])
            words.append(concepts["shape"][shape_i] if use_shape else "object")
            parts.append("a " + " ".join(words))
        texts.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(" and ".join(parts)))
    return texts, desc


def truth_matrix(desc_T23: torch.Tensor, objs_I03: torch.Tensor) -> torch.Tensor:
    """``[T, I]``: is description t true of image i (every described object is present)?"""
    d = desc_T23[:, None, :, None, :]  # T,1,2,1,3
    o = objs_I03[None, :, None, :, :]  # 1,I,1,O,3
    attr_ok = (d == -1) | (d == o)
    obj_ok = attr_ok.all(-1) & (o[..., 0] >= 0)  # T,I,2,O
    slot_ok = obj_ok.any(-1) | (desc_T23[:, None, :, 0] == -2)  # T,I,2
    return slot_ok.all(-1)


def multi_positive_nce(sim_TI: torch.Tensor, labels_TI: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every true (text, image) pair is a positive, weighted 1/#positives.

    The sigmoid loss alone spends most of its gradient on easy negatives; this softmax term makes the
    images compete for each description (and descriptions for each image), which is what teaches shape.
    """
    w_txt = labels_TI / labels_TI.sum(1, keepdim=True).clamp_min(1)
    w_img = labels_TI / labels_TI.sum(0, keepdim=True).clamp_min(1)
    text_to_image = -(w_txt * sim_TI.log_softmax(1)).sum(1)
    image_to_text = -(w_img * sim_TI.log_softmax(0)).sum(0)
    return text_to_image[labels_TI.sum(1) > 0].mean() + image_to_text[labels_TI.sum(0) > 0].mean()


def train_vlm(
    p: VlmModelParams,
    data: SplitArrays,
    concepts: dict[str, list[str]],
    categories: Sequence[str],
    *,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[CLIPModel, PreTrainedTokenizerFast, dict[str, float]]:
    torch.manual_seed(p.train.seed)
    rng = np.random.default_rng(p.train.seed)
    tokenizer = build_tokenizer(concepts, categories)
    n, size = data.images.shape[0], data.images.shape[1]
    model = build_clip(p, size, len(tokenizer))
    model.train()
    bias = torch.nn.Parameter(torch.tensor(-2.0))
    opt, sched = make_optimizer(model, p.train, extra=[bias])
    max_obj = max(len(a) for a in data.attributes)
    objs = _encode_objects(data.attributes, concepts, max_obj)
    bs = p.train.batch_size

    def step(_i: int) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, n, size=bs)
        imgs = data.images[idx].copy()
        flip = rng.random(bs) < 0.5
        imgs[flip] = imgs[flip, :, ::-1]
        texts, desc = sample_descriptions(rng, objs[idx], concepts)
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        img_e = F.normalize(
            model.get_image_features(pixel_values=to_pixel_tensor(imgs, MEAN, STD)).pooler_output, dim=-1
        )
        txt_e = F.normalize(
            model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
            ).pooler_output,
            dim=-1,
        )
        logits = model.logit_scale.exp().clamp(max=100) * txt_e @ img_e.T + bias
        labels = truth_matrix(torch.from_numpy(desc), torch.from_numpy(objs[idx])).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels) + NCE_WEIGHT * multi_positive_nce(
            logits - bias, labels
        )
        acc = ((logits > 0).float() == labels).float().mean()
        return {"loss": loss, "pair_accuracy": acc.detach(), "positives": labels.mean()}

    history = run_steps(p.train, step, opt, sched, [*model.parameters(), bias], progress=progress)
    model.eval()
    return model, tokenizer, history


def save_vlm(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    image_processor().save_pretrained(str(folder))
