"""Zero-shot classification by text prompts.

A *prompt family* is a template whose fields are concept names (toy world: ``{color}``, ``{shape}``,
``{size}``) or ``{category}``. Its classes are every combination of the fields' values; an image's label
is the combination its single object has. Only images with exactly one object are scored.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass

import numpy as np
import torch

from blueglass.data import CocoDataset
from blueglass.errors import ConfigError


@dataclass(frozen=True)
class PromptFamily:
    name: str
    template: str
    fields: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]  # one value tuple per prompt

    @property
    def prompts(self) -> list[str]:
        return [self.template.format(**dict(zip(self.fields, c, strict=True))) for c in self.classes]

    def label(self, values: dict[str, str]) -> int:
        return self.classes.index(tuple(values[f] for f in self.fields))


def _fields(template: str) -> tuple[str, ...]:
    return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)


def prompt_families(ds: CocoDataset, templates: dict[str, str]) -> list[PromptFamily]:
    vocab = dict(ds.concepts)
    vocab["category"] = ds.category_names
    families = []
    for name, template in templates.items():
        fields = _fields(template)
        unknown = [f for f in fields if f not in vocab]
        if not fields or unknown:
            raise ConfigError(
                f"benchmark.prompts.{name}: template {template!r} needs fields from {sorted(vocab)}"
                + (f", not {unknown}" if unknown else "")
            )
        classes = tuple(itertools.product(*(vocab[f] for f in fields)))
        families.append(PromptFamily(name, template, fields, classes))
    return families


def image_values(ds: CocoDataset, record) -> dict[str, str] | None:
    """Concept values of a single-object image (``None`` when it has zero or several objects)."""
    if len(record.annotations) != 1:
        return None
    ann = record.annotations[0]
    return {**ann.attributes, "category": ds.categories[ann.category_id]}


def zero_shot_accuracy(logits: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    pred = np.asarray(torch.as_tensor(logits).argmax(-1))
    return float((pred == np.asarray(labels)).mean()) if len(labels) else float("nan")
