"""castseg.eval.pseudo_label_quality: what L_semi's instances get right and wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from castseg.data import masks as M
from castseg.data.coco_io import load_coco
from castseg.eval.pseudo_label_quality import label_quality

H, W = 20, 40


def box(y0: int, x0: int, y1: int, x1: int) -> dict:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return M.encode(m)


# three nuclei: A and B side by side, C apart
A, B, C = box(2, 2, 8, 8), box(2, 9, 8, 15), box(12, 30, 18, 36)


@pytest.fixture
def truth(tmp_path: Path):
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": s, "iscrowd": 0}
            for k, s in enumerate((A, B, C))]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
                                "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}))
    return load_coco(path)


def rec(segm: dict, score: float) -> dict:
    return {"image_id": 1, "category_id": 1, "score": score, "segmentation": segm}


def test_counts_matched_merged_and_off_target_above_the_threshold(truth):
    records = [rec(A, 0.9),                      # right
               rec(box(1, 1, 10, 17), 0.8),      # A and B in one mask (IoU with each 36/144): merged
               rec(box(12, 2, 18, 8), 0.7),      # on no nucleus: off target
               rec(C, 0.2)]                      # right, but below L_semi's threshold
    q = label_quality(truth, records, 0.3)
    assert q == {"score_threshold": 0.3, "pseudo_labels": 3, "truth": 3, "matched": 1, "precision": 1 / 3,
                 "recall": 1 / 3, "merged": 1, "off_target": 1}
    low = label_quality(truth, records, 0.1)
    assert (low["pseudo_labels"], low["matched"], low["precision"], low["recall"]) == (4, 2, 0.5, 2 / 3)


def test_one_nucleus_is_matched_once_and_by_the_higher_score(truth):
    # a duplicate of A scored lower finds A taken: it is wrong, not a second hit
    q = label_quality(truth, [rec(A, 0.5), rec(A, 0.9)], 0.3)
    assert (q["matched"], q["precision"], q["merged"], q["off_target"]) == (1, 0.5, 0, 0)
    # a category the truth does not have on this image matches nothing
    other = {**rec(A, 0.9), "category_id": 2}
    assert label_quality(truth, [other], 0.3)["matched"] == 0
    assert label_quality(truth, [], 0.3)["precision"] is None
