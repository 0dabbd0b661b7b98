"""Evaluation: COCO AP/AR (faster-coco-eval), Cityscapes instance AP, and the results format.

``cityscapesscripts`` and ``faster_coco_eval`` are imported on first use inside the evaluators,
so importing this package (e.g. for :func:`instances_to_results` in a predictor) stays cheap.
"""

from __future__ import annotations

from castseg.eval.cityscapes_eval import evaluate_cityscapes
from castseg.eval.coco_eval import STAT_KEYS, evaluate_coco, format_stats, load_gt
from castseg.eval.results import instances_to_results, load_results, validate_results, write_results

__all__ = [
    "STAT_KEYS",
    "evaluate_cityscapes",
    "evaluate_coco",
    "format_stats",
    "instances_to_results",
    "load_gt",
    "load_results",
    "validate_results",
    "write_results",
]
