"""Datasets: the procedurally generated toy world and the COCO-format reader every dataset goes through."""

from blueglass.data.coco import Annotation, CocoDataset, ImageRecord
from blueglass.data.toyworld import COLORS, SHAPES, SIZES, generate_split, generate_toyworld

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "Annotation",
    "CocoDataset",
    "ImageRecord",
    "generate_split",
    "generate_toyworld",
]
