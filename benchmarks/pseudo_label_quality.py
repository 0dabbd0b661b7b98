"""Precision and recall of cached pseudo-labels against the unlabeled images' own labels (not a test).

A pseudo-label counts as right when it overlaps a not yet matched ground-truth instance by mask
IoU ≥ 0.5 (greedy, by descending score, per image); recall is over the ground-truth instances.
What the wrong ones are: *merged* (more than half of each of ≥ 2 ground-truth nuclei lies inside
it) and *off target* (under 30 % of its pixels on any nucleus). Printed per score threshold, as
the student's L_semi would see the cache (``loss.score_threshold``)::

    python benchmarks/pseudo_label_quality.py --gt runs/dsb_protocol_v3/splits/domain_s0_10/unlabeled_gt.json \\
        --caches runs/dsb_protocol_v3/domain/table1_s0/pseudo_labels/{adapt_a,teacher}.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from castseg.data import masks as M
from castseg.data.coco_io import load_coco
from castseg.models.teacher import mask_iou
from castseg.pseudo_labels import load_pseudo_labels


def _stack(rles: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([M.decode(r) for r in rles])).bool()  # [N, H, W]


def matches(pred: list[dict], gt: list[dict], iou_threshold: float = 0.5) -> int:
    """Greedy one-to-one matches of ``pred`` (descending score) to ``gt`` RLEs at ``iou_threshold``."""
    if not pred or not gt:
        return 0
    iou = mask_iou(_stack(pred), _stack(gt))
    used: set[int] = set()
    for row in iou:
        free = [(float(v), j) for j, v in enumerate(row) if j not in used and v >= iou_threshold]
        if free:
            used.add(max(free)[1])
    return len(used)


def wrong_kinds(pred: list[dict], gt: list[dict]) -> tuple[int, int]:
    """(merged, off target) counts of ``pred`` against ``gt`` (see the module docstring)."""
    if not pred:
        return 0, 0
    if not gt:
        return 0, len(pred)
    p, g = _stack(pred).flatten(1).float(), _stack(gt).flatten(1).float()  # [N, HW], [G, HW]
    inside = (p @ g.T) / g.sum(1).clamp(min=1)[None]  # share of each nucleus inside each pseudo-label
    on_nuclei = (p * g.amax(0)[None]).sum(1) / p.sum(1).clamp(min=1)
    return int(((inside > 0.5).sum(1) >= 2).sum()), int((on_nuclei < 0.3).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", type=Path, required=True, help="the unlabeled images' own labels (unlabeled_gt.json)")
    ap.add_argument("--caches", type=Path, nargs="+", required=True, help="pseudo-label caches (COCO results)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    args = ap.parse_args()
    gt = load_coco(args.gt)
    truth: dict[int, list[dict]] = {img["id"]: [] for img in gt.images}
    for a in gt.annotations:
        img = gt.image_by_id[a["image_id"]]
        truth[a["image_id"]].append(M.segmentation_to_rle(a["segmentation"], img["height"], img["width"]))
    n_gt = sum(len(v) for v in truth.values())
    print(f"| cache | score ≥ | pseudo-labels | matched (IoU ≥ 0.5) | precision | recall (of {n_gt}) "
          "| merged (≥ 2 nuclei) | off target |")
    print("|---|---|---|---|---|---|---|---|")
    for cache in args.caches:
        for th in args.thresholds:
            labels = load_pseudo_labels(cache, score_threshold=th)
            n_pred = sum(len(e["masks"]) for e in labels.values())
            hit = sum(matches(labels.get(i, {}).get("masks", []), g) for i, g in truth.items())
            kinds = [wrong_kinds(labels.get(i, {}).get("masks", []), g) for i, g in truth.items()]
            merged, off = (sum(k[j] for k in kinds) for j in (0, 1))
            print(f"| {cache.name} | {th:g} | {n_pred} | {hit} | {hit / max(n_pred, 1):.2f} | {hit / n_gt:.2f} "
                  f"| {merged} | {off} |")


if __name__ == "__main__":
    main()
