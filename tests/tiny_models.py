"""Tiny random-weight configurations of the real-model families (no downloads), shared by the adapter
and recipe tests."""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    ".",
    "a",
    "photo",
    "of",
    "an",
    "object",
    "circle",
    "square",
    "triangle",
    "shape",
    "ring",
    "box",
    "red",
    "green",
    "blue",
    "star",
]


def write_tokenizer(folder):
    from transformers import BertTokenizer

    vocab = folder / "vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizer(str(vocab))
    tok.save_pretrained(str(folder))
    return tok


def resnet_config(out_features):
    from transformers import ResNetConfig

    return ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


TINY_DEC = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    num_queries=9,
)
TOY_LABELS = {0: "circle", 1: "square", 2: "triangle"}
TEXT = dict(
    vocab_size=len(WORDS),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=16,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
)


def tiny_detr(folder: Path, num_queries: int = 9) -> Path:
    """A random ``DetrForObjectDetection`` labelled with the toy world's shapes, saved to ``folder``."""
    from transformers import DetrConfig, DetrForObjectDetection

    cfg = DetrConfig(
        backbone_config=resnet_config(["stage4"]),
        id2label=TOY_LABELS,
        **{**TINY_DEC, "num_queries": num_queries},
    )
    DetrForObjectDetection(cfg).save_pretrained(str(folder))
    return Path(folder)
