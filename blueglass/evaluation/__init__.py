"""Task metrics: COCO detection AP (faster-coco-eval) and zero-shot classification accuracy."""

from blueglass.evaluation.classification import PromptFamily, prompt_families, zero_shot_accuracy
from blueglass.evaluation.detection import DETECTION_METRICS, evaluate_detections

__all__ = [
    "DETECTION_METRICS",
    "PromptFamily",
    "evaluate_detections",
    "prompt_families",
    "zero_shot_accuracy",
]
