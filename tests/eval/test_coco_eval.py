"""`castseg eval` (COCO protocol): reference stats on cocoapi's fixture, synthetic cases, bad input."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from castseg import cli
from castseg.data import masks as M
from castseg.eval import STAT_KEYS, evaluate_coco

GT_NAME = "instances_val2014_100.json"
PRED_NAME = {"segm": "instances_val2014_fakesegm100_results.json", "bbox": "instances_val2014_fakebbox100_results.json"}


@pytest.fixture(autouse=True)
def only_eval_verb(monkeypatch):
    # Other verbs are written in parallel; a half-finished one must not break these tests.
    monkeypatch.setattr(cli, "COMMANDS", ["eval"])


def expected_stats(fixture: Path, iou_type: str) -> list[float]:
    """The 12 full-precision reference numbers for ``iou_type`` from EXPECTED_STATS.md."""
    text = (fixture / "EXPECTED_STATS.md").read_text()
    block = re.search(rf"^{iou_type}:(.*?)\(cocoapi", text, re.S | re.M).group(1)
    vals = [float(v) for v in re.findall(r"\d+\.\d+", block)]
    assert len(vals) == 12
    return vals


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_fixture_matches_reference_library(coco_fixture, iou_type):
    stats = evaluate_coco(coco_fixture / GT_NAME, coco_fixture / PRED_NAME[iou_type], iou_type)
    assert list(stats) == list(STAT_KEYS)
    np.testing.assert_allclose([stats[k] for k in STAT_KEYS], expected_stats(coco_fixture, iou_type), rtol=0, atol=1e-6)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_fixture_matches_reference_cli_json(coco_fixture, iou_type, capsys):
    code, out, err = run_cli(["eval", "--gt", str(coco_fixture / GT_NAME), "--pred",
                              str(coco_fixture / PRED_NAME[iou_type]), "--iou-type", iou_type, "--json"], capsys)
    assert code == 0, err
    stats = json.loads(out)  # the whole of stdout is one JSON object
    assert list(stats) == list(STAT_KEYS)
    np.testing.assert_allclose([stats[k] for k in STAT_KEYS], expected_stats(coco_fixture, iou_type), rtol=0, atol=1e-6)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_fixture_agrees_with_pycocotools(coco_fixture, iou_type):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        gt = COCO(str(coco_fixture / GT_NAME))
        ev = COCOeval(gt, gt.loadRes(str(coco_fixture / PRED_NAME[iou_type])), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = evaluate_coco(coco_fixture / GT_NAME, coco_fixture / PRED_NAME[iou_type], iou_type)
    # Observed max |diff| on this fixture: ~2e-16 (float summation order only).
    np.testing.assert_allclose([ours[k] for k in STAT_KEYS], ev.stats, rtol=0, atol=1e-6)


def test_table_output(coco_fixture, capsys):
    code, out, _ = run_cli(["eval", "--gt", str(coco_fixture / GT_NAME), "--pred",
                            str(coco_fixture / PRED_NAME["segm"])], capsys)
    assert code == 0
    rows = [line for line in out.splitlines() if "@[ IoU=" in line]
    assert len(rows) == 12
    assert rows[0].endswith("= 0.320") and "maxDets=  1" in rows[6]


# ---- synthetic ------------------------------------------------------------------------------

def synthetic_gt() -> dict:
    """2 images (30x40, 50x60), 3 objects of two categories, one of them small."""
    images = [{"id": 1, "file_name": "a.png", "height": 30, "width": 40},
              {"id": 2, "file_name": "b.png", "height": 50, "width": 60}]
    boxes = [(1, 1, 2, 3, 20, 25), (2, 1, 10, 5, 30, 40), (3, 2, 20, 30, 45, 58)]  # ann, img, y0, x0, y1, x1
    anns = []
    for ann_id, img_id, y0, x0, y1, x1 in boxes:
        img = images[img_id - 1]
        m = np.zeros((img["height"], img["width"]), np.uint8)
        m[y0:y1, x0:x1] = 1
        rle = M.encode(m)
        anns.append({"id": ann_id, "image_id": img_id, "category_id": 1 if ann_id < 3 else 5,
                     "segmentation": rle, "area": float(M.area(rle)), "bbox": M.bbox(rle), "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "cell"}, {"id": 5, "name": "blob"}]}


def perfect_preds(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "segmentation": a["segmentation"], "bbox": a["bbox"]} for a in gt["annotations"]]


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_perfect_predictions_give_ap_one(iou_type):
    gt = synthetic_gt()
    preds = perfect_preds(gt)
    gt_before, preds_before = copy.deepcopy(gt), copy.deepcopy(preds)
    stats = evaluate_coco(gt, preds, iou_type)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert stats["APl"] == -1.0  # no large GT: undefined, as COCO reports it
    # in-memory inputs come back untouched (the evaluator annotates its own copies)
    assert gt == gt_before and preds == preds_before


def test_empty_predictions_give_zero(tmp_path, capsys):
    gt = synthetic_gt()
    stats = evaluate_coco(gt, [], "segm")
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text("[]")
    code, out, err = run_cli(["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["AP"] == 0.0


def test_half_right_predictions_score_between(tmp_path):
    gt = synthetic_gt()
    preds = perfect_preds(gt)
    shifted = np.roll(M.decode(preds[0]["segmentation"]), 12, axis=1)  # IoU < 0.5 with its GT
    preds[0]["segmentation"] = M.encode(shifted)
    assert 0.0 < evaluate_coco(gt, preds)["AP"] < 1.0


# ---- bad input: one line naming the file, exit 2 -----------------------------------------------

def write_case(tmp_path: Path, pred_text: str) -> tuple[Path, Path]:
    (tmp_path / "gt.json").write_text(json.dumps(synthetic_gt()))
    (tmp_path / "pred.json").write_text(pred_text)
    return tmp_path / "gt.json", tmp_path / "pred.json"


def good_record() -> dict:
    return perfect_preds(synthetic_gt())[0]


@pytest.mark.parametrize("pred_text, message", [
    ("{not json", "not valid JSON"),
    ('{"annotations": []}', "expected a JSON list"),
    (json.dumps([{k: v for k, v in good_record().items() if k != "score"}]), "record #0: missing key 'score'"),
    (json.dumps([good_record(), {k: v for k, v in good_record().items() if k != "segmentation"}]),
     "record #1: missing key 'segmentation'"),
    (json.dumps([dict(good_record(), image_id=999)]), "record #0: image_id 999"),
    (json.dumps([dict(good_record(), category_id=77)]), "record #0: category_id 77"),
    (json.dumps([dict(good_record(), score="high")]), "record #0: score"),
    (json.dumps([dict(good_record(), segmentation={"size": [3, 3], "counts": "abc"})]), "record #0: RLE size"),
    (json.dumps([dict(good_record(), segmentation={"size": [30, 40], "counts": "!!!!"})]), "cannot be parsed"),
])
def test_bad_predictions_fail_with_one_line(tmp_path, capsys, pred_text, message):
    gt, pred = write_case(tmp_path, pred_text)
    code, out, err = run_cli(["eval", "--gt", str(gt), "--pred", str(pred)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(pred) in err and message in err


def test_bbox_eval_needs_bbox_key(tmp_path, capsys):
    rec = {k: v for k, v in good_record().items() if k != "bbox"}
    gt, pred = write_case(tmp_path, json.dumps([rec]))
    code, _, err = run_cli(["eval", "--gt", str(gt), "--pred", str(pred), "--iou-type", "bbox"], capsys)
    assert code == 2 and "missing key 'bbox'" in err and str(pred) in err


def test_bad_gt_fails_with_one_line(tmp_path, capsys):
    gt = synthetic_gt()
    gt["annotations"][1]["image_id"] = 42
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text("[]")
    code, _, err = run_cli(["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "gt.json") in err and "annotation #1" in err


def test_missing_pred_file(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(synthetic_gt()))
    code, _, err = run_cli(["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "nope.json: file not found" in err


def test_accepts_coco_data_without_mutating_it(tmp_path):
    from castseg.data.coco_io import load_coco

    (tmp_path / "gt.json").write_text(json.dumps(synthetic_gt()))
    coco = load_coco(tmp_path / "gt.json")
    before = copy.deepcopy(coco.annotations)
    assert evaluate_coco(coco, perfect_preds(synthetic_gt()))["AP"] == pytest.approx(1.0)
    assert coco.annotations == before


def test_max_dets_uncaps_recall_in_dense_images(tmp_path, capsys):
    # 150 objects in one image (DSB2018 nuclei images hold up to 375): COCO's default 100
    # detections cap recall; --max-dets lifts the cap.
    h, w = 60, 250
    anns = []
    for k in range(150):
        m = np.zeros((h, w), np.uint8)
        y, x = (k // 25) * 10, (k % 25) * 10
        m[y:y + 8, x:x + 8] = 1
        rle = M.encode(m)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                     "area": float(M.area(rle)), "bbox": M.bbox(rle), "iscrowd": 0})
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}], "annotations": anns,
          "categories": [{"id": 1, "name": "nucleus"}]}
    preds = perfect_preds(gt)
    capped = evaluate_coco(gt, preds, "segm")
    assert capped["AR100"] == pytest.approx(100 / 150) and capped["AP"] < 0.7
    full = evaluate_coco(gt, preds, "segm", max_dets=200)
    assert full["AP"] == pytest.approx(1.0) and full["AR100"] == pytest.approx(1.0)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    code, out, err = run_cli(["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                              "--max-dets", "400", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["AP"] == pytest.approx(1.0)
