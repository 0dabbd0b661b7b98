"""COCO results records: building them from model outputs, writing, reading back with validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from castseg.data import masks as M
from castseg.errors import InputError
from castseg.eval import evaluate_coco, instances_to_results, load_gt, load_results, write_results


def gt_dict() -> dict:
    return {"images": [{"id": 3, "file_name": "a.png", "height": 20, "width": 30}],
            "annotations": [], "categories": [{"id": 9, "name": "cell"}]}


def masks_scores_labels():
    m = np.zeros((2, 20, 30), bool)
    m[0, 2:6, 3:10] = True
    m[1, 10:18, 20:29] = True
    return m, np.array([0.9, 0.4], np.float32), np.array([9, 9])


def test_instances_to_results_numpy():
    m, s, lab = masks_scores_labels()
    recs = instances_to_results(3, m, s, lab)
    assert len(recs) == 2
    assert recs[0]["bbox"] == [3.0, 2.0, 7.0, 4.0]  # [x, y, w, h]
    assert recs[0]["segmentation"]["size"] == [20, 30] and isinstance(recs[0]["segmentation"]["counts"], str)
    assert np.array_equal(M.decode(recs[1]["segmentation"]), m[1])
    assert recs[1]["score"] == pytest.approx(0.4) and recs[1]["category_id"] == 9
    json.dumps(recs)  # plain JSON types only (no numpy scalars)


def test_instances_to_results_torch_and_empty():
    torch = pytest.importorskip("torch")
    m, s, lab = masks_scores_labels()
    recs = instances_to_results(torch.tensor(3), torch.from_numpy(m), torch.from_numpy(s), torch.from_numpy(lab))
    assert recs == instances_to_results(3, m, s, lab)
    assert instances_to_results(3, torch.zeros((0, 20, 30), dtype=torch.bool), torch.zeros(0), torch.zeros(0)) == []
    assert instances_to_results(3, [], [], []) == []
    with pytest.raises(ValueError, match="must match"):
        instances_to_results(3, m, s[:1], lab)


def test_write_load_roundtrip_and_evaluate(tmp_path):
    m, s, lab = masks_scores_labels()
    recs = instances_to_results(3, m, s, lab)
    write_results(recs, tmp_path / "out" / "pred.json")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pred.json"]  # no temp file left behind
    gt = load_gt(gt_dict())
    assert load_results(tmp_path / "out" / "pred.json", gt) == recs
    assert load_results(tmp_path / "out" / "pred.json", gt, "bbox") == recs
    # predictions scored against themselves as GT: perfect
    g = gt_dict()
    g["annotations"] = [{"id": k + 1, "image_id": 3, "category_id": 9, "segmentation": r["segmentation"],
                         "area": float(M.area(r["segmentation"])), "bbox": r["bbox"], "iscrowd": 0}
                        for k, r in enumerate(recs)]
    assert evaluate_coco(g, tmp_path / "out" / "pred.json")["AP"] == pytest.approx(1.0)


def test_empty_results_are_valid(tmp_path):
    write_results([], tmp_path / "p.json")
    assert load_results(tmp_path / "p.json", load_gt(gt_dict())) == []


def test_polygon_and_uncompressed_rle_are_normalised(tmp_path):
    poly = {"image_id": 3, "category_id": 9, "score": 0.5, "segmentation": [[1, 1, 8, 1, 8, 6, 1, 6]]}
    rle = M.encode(np.ones((20, 30), np.uint8))
    unc = {"image_id": 3, "category_id": 9, "score": 0.5,
           "segmentation": {"size": [20, 30], "counts": [0, 600]}}
    (tmp_path / "p.json").write_text(json.dumps([poly, unc]))
    out = load_results(tmp_path / "p.json", load_gt(gt_dict()))
    assert all(isinstance(r["segmentation"]["counts"], str) for r in out)
    assert out[1]["segmentation"] == rle


@pytest.mark.parametrize("records, message", [
    ({"image_id": 3}, "expected a JSON list"),
    ([5], "record #0: must be an object"),
    ([{"image_id": 3, "category_id": 9, "score": 1.0, "bbox": [0, 0, 1, 1]}], "record #0: missing key 'segmentation'"),
    ([{"image_id": 4, "category_id": 9, "score": 1.0, "segmentation": {"size": [20, 30], "counts": "0"}}],
     "record #0: image_id 4"),
    ([{"image_id": 3, "category_id": 1, "score": 1.0, "segmentation": {"size": [20, 30], "counts": "0"}}],
     "record #0: category_id 1"),
    ([{"image_id": 3, "category_id": 9, "score": float("nan"), "segmentation": {"size": [20, 30], "counts": "0"}}],
     "record #0: score"),
    ([{"image_id": 3, "category_id": 9, "score": 1, "segmentation": [[1, 2]]}], "record #0: polygon"),
    ([{"image_id": 3, "category_id": 9, "score": 1, "segmentation": {"size": [20, 30], "counts": "0"},
       "bbox": [0, 0, -1, 2]}], "record #0: bbox width"),
])
def test_validation_names_file_and_record(tmp_path, records, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    with pytest.raises(InputError, match="record|list") as e:
        load_results(path, load_gt(gt_dict()))
    assert str(path) in str(e.value) and message in str(e.value)
