"""What a pseudo-label cache gets right and wrong, against the unlabeled images' own labels.

AP says how good the pseudo-labels are as a ranking; the student, though, learns from the
instances above L_semi's score threshold as if they were ground truth. This counts those
instances the way the student sees them:

- *matched*: overlaps a not yet matched ground-truth instance of its class by mask IoU ≥ 0.5
  (greedy, by descending score, per image) → precision = matched / kept, recall = matched / truth;
- *merged*: more than half of each of ≥ 2 ground-truth instances lies inside it (one target
  where the labels have several: a student taught this learns to merge);
- *off target*: under 30 % of its pixels lie on any ground-truth instance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from castseg.data import masks as M
from castseg.data.coco_io import CocoData, annotation_rle


def _greedy_matches(iou: np.ndarray, threshold: float) -> int:
    """One-to-one matches of the rows (descending score) to the columns at ``iou ≥ threshold``."""
    used: set[int] = set()
    for row in iou:
        free = [(v, j) for j, v in enumerate(row) if j not in used and v >= threshold]
        if free:
            used.add(max(free)[1])
    return len(used)


def _image_counts(pred: list[dict], truth: list[dict], iou_threshold: float) -> tuple[int, int, int]:
    """(matched, merged, off target) of one image's pseudo-label RLEs (descending score)."""
    if not pred:
        return 0, 0, 0
    if not truth:
        return 0, 0, len(pred)
    matched = _greedy_matches(M.overlap(pred, truth), iou_threshold)
    inside = M.overlap(truth, pred, inside=True)  # [G, P]: share of each instance inside each pseudo-label
    merged = int(((inside > 0.5).sum(0) >= 2).sum())
    on_truth = M.overlap(pred, [M.union(truth)], inside=True)[:, 0]
    return matched, merged, int((on_truth < 0.3).sum())


def label_quality(gt: CocoData, records: list[dict[str, Any]], score_threshold: float,
                  iou_threshold: float = 0.5) -> dict[str, Any]:
    """Counts and rates of the COCO results ``records`` with ``score ≥ score_threshold`` against
    ``gt`` (see the module docstring); per image and category."""
    truth: dict[tuple[int, int], list[dict]] = {}
    for a in gt.annotations:
        truth.setdefault((a["image_id"], a["category_id"]), []).append(annotation_rle(a, gt.image_by_id[a["image_id"]]))
    kept: dict[tuple[int, int], list[dict]] = {}
    for r in sorted((r for r in records if r["score"] >= score_threshold), key=lambda r: -r["score"]):
        kept.setdefault((r["image_id"], r["category_id"]), []).append(r["segmentation"])
    counts = np.array([_image_counts(kept.get(k, []), truth.get(k, []), iou_threshold)
                       for k in set(kept) | set(truth)]).reshape(-1, 3).sum(0)
    n_kept, n_truth = sum(map(len, kept.values())), sum(map(len, truth.values()))
    matched, merged, off = (int(v) for v in counts)
    return {"score_threshold": score_threshold, "pseudo_labels": n_kept, "truth": n_truth, "matched": matched,
            "precision": matched / n_kept if n_kept else None, "recall": matched / n_truth if n_truth else None,
            "merged": merged, "off_target": off}
