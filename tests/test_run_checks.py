"""The premise ratio and the pseudo-labels' AP that every run records (castseg.run_checks), and
how the demo table and the report show them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from castseg.demo import results_table
from castseg.data import masks as M
from castseg.errors import InputError
from castseg.report import write_report
from castseg.config import RunConfig
from castseg.run_checks import (load_unlabeled_gt, merge_rows, premise_ratio, premise_text, pseudo_label_ap,
                                 pseudo_label_rows)

H, W = 16, 20
# two images, two non-overlapping "nuclei" each
BOXES = {1: [(1, 1), (8, 10)], 2: [(2, 3), (9, 12)]}


def box(y: int, x: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y:y + 5, x:x + 6] = 1
    return m


def write_gt(root: Path) -> tuple[Path, Path]:
    """(unlabeled.json without annotations, unlabeled_gt.json with them) over the same images."""
    images = [{"id": i, "file_name": f"im{i}.png", "height": H, "width": W} for i in BOXES]
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": 1, "segmentation": M.encode(box(*b)), "iscrowd": 0}
            for i, bs in BOXES.items() for k, b in enumerate(bs)]
    cats = [{"id": 1, "name": "nucleus"}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "unlabeled.json").write_text(json.dumps({"images": images, "categories": cats}))
    (root / "unlabeled_gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "unlabeled.json", root / "unlabeled_gt.json"


def results(path: Path, wrong: int = 0, wrong_score: float = 0.2) -> Path:
    """The GT as predictions (score 0.9), the first instance of the first ``wrong`` images moved
    to a corner (IoU < 0.5 with every nucleus) and scored ``wrong_score``."""
    recs = []
    for n, (i, bs) in enumerate(BOXES.items()):
        for k, b in enumerate(bs):
            bad = n < wrong and k == 0
            m = box(11, 14) if bad else box(*b)
            recs.append({"image_id": i, "category_id": 1, "score": wrong_score if bad else 0.9,
                         "segmentation": M.encode(m)})
    path.write_text(json.dumps(recs))
    return path


def cfg_for(unlabeled: Path, gt: Path | None) -> RunConfig:
    return RunConfig.model_validate({"data": {"labeled": "unused.json", "unlabeled": str(unlabeled),
                                              "unlabeled_gt": str(gt) if gt else None}, "eval": {"max_dets": 100}})


def test_premise_ratio_is_adapted_teacher_over_supervised_student():
    assert premise_ratio({"teacher_adapted": {"AP": 0.25}, "student_supervised": {"AP": 0.5}}) == 0.5
    assert premise_ratio({"teacher_adapted": {"AP": 0.3}, "student_supervised": {"AP": 0.2}}) == pytest.approx(1.5)
    assert premise_ratio({"teacher_adapted": {"AP": 0.3}, "student_supervised": {"AP": 0.0}}) is None
    assert premise_ratio({"teacher_adapted": {"AP": 0.3}}) is None
    # -1 is COCO's "undefined" (no ground truth): no ratio either
    assert premise_ratio({"teacher_adapted": {"AP": -1.0}, "student_supervised": {"AP": 0.2}}) is None
    assert premise_text({"teacher_adapted": {"AP": 0.3}, "student_supervised": {"AP": 0.2}}) == \
        "premise: adapted teacher / supervised-only student = 1.50x (CAST needs > 1)"
    assert premise_text({"teacher_adapted": {"AP": 0.3}, "student_supervised": {"AP": 0.0}}) == \
        "premise: adapted teacher / supervised-only student = — (the supervised-only AP is 0)"


def test_pseudo_label_ap_against_the_unlabeled_ground_truth(tmp_path):
    unlabeled, gt_path = write_gt(tmp_path)
    gt = load_unlabeled_gt(cfg_for(unlabeled, gt_path))
    assert pseudo_label_ap(gt, results(tmp_path / "same.json"), 100) == {"AP": 1.0, "AP50": 1.0}
    # half the instances wrong, scored below the right ones: precision 1 up to recall 1/2, then
    # nothing: 51 of COCO's 101 recall points at every IoU threshold
    half = pseudo_label_ap(gt, results(tmp_path / "half.json", wrong=2), 100)
    assert half["AP"] == pytest.approx(51 / 101, abs=1e-9) and half["AP50"] == pytest.approx(51 / 101, abs=1e-9)
    # the same wrong ones scored above the right ones: precision 1/2 at recall 1/2
    ranked_first = pseudo_label_ap(gt, results(tmp_path / "first.json", wrong=2, wrong_score=0.95), 100)
    assert ranked_first["AP"] == pytest.approx(0.5 * 51 / 101, abs=1e-9)
    rows = pseudo_label_rows(cfg_for(unlabeled, gt_path), "adapt_a", tmp_path / "half.json")
    # at L_semi's threshold (0.3) the two wrong ones (0.2) are dropped: both kept are right,
    # and two of the four nuclei have none
    quality = {"score_threshold": 0.3, "pseudo_labels": 2, "truth": 4, "matched": 2, "precision": 1.0,
               "recall": 0.5, "merged": 0, "off_target": 0}
    assert rows == {"pseudo_labels": {"ground_truth": str(gt_path), "num_images": 2,
                                      "adapt_a": {**half, "file": str(tmp_path / "half.json"), "quality": quality}}}
    first = pseudo_label_rows(cfg_for(unlabeled, gt_path), "adapt_a", tmp_path / "first.json")
    # scored above the threshold the wrong ones count; on image 2 the moved box still lies 40 % on
    # a nucleus (IoU 0.25: wrong, but not off target)
    assert first["pseudo_labels"]["adapt_a"]["quality"] == {**quality, "pseudo_labels": 4, "precision": 0.5,
                                                           "off_target": 1}
    # the rows of the second cache join the first's
    later = pseudo_label_rows(cfg_for(unlabeled, gt_path), "teacher", tmp_path / "same.json")
    merged = merge_rows(merge_rows({"teacher_adapted": {"AP": 0.1}}, rows), later)
    assert merged["pseudo_labels"]["adapt_a"]["AP"] == half["AP"] and merged["pseudo_labels"]["teacher"]["AP"] == 1.0
    assert merged["teacher_adapted"] == {"AP": 0.1}
    # no ground truth: nothing recorded, nothing invented
    assert pseudo_label_rows(cfg_for(unlabeled, None), "adapt_a", tmp_path / "half.json") == {}


def test_unlabeled_gt_errors_name_both_files(tmp_path):
    unlabeled, gt_path = write_gt(tmp_path)
    with pytest.raises(InputError, match=r"missing\.json: data\.unlabeled_gt: no such file"):
        load_unlabeled_gt(cfg_for(unlabeled, tmp_path / "missing.json"))
    other = json.loads(unlabeled.read_text())
    other["images"] = other["images"][:1]
    (tmp_path / "one.json").write_text(json.dumps(other))
    with pytest.raises(InputError) as e:
        load_unlabeled_gt(cfg_for(tmp_path / "one.json", gt_path))
    assert str(gt_path) in str(e.value) and "one.json" in str(e.value) and "1 image(s) only here" in str(e.value)
    # a pseudo-label record for an image the ground truth lacks: an error, not a crash
    gt = load_unlabeled_gt(cfg_for(unlabeled, gt_path))
    recs = json.loads(results(tmp_path / "r.json").read_text())
    recs[0]["image_id"] = 99
    (tmp_path / "r.json").write_text(json.dumps(recs))
    with pytest.raises(InputError) as e:
        pseudo_label_ap(gt, tmp_path / "r.json", 100)
    assert str(e.value).startswith(f"{tmp_path / 'r.json'}: 1 image id(s)") and str(gt_path) in str(e.value)


def test_quality_counts_the_instances_the_cleanup_leaves(tmp_path):
    """With ``loss.pseudo_label_overlaps: exclusive`` the report counts what L_semi is taught: a
    duplicate of every nucleus halves precision raw and is gone cleaned; AP stays the teacher's."""
    unlabeled, gt_path = write_gt(tmp_path)
    recs = json.loads(results(tmp_path / "r.json").read_text())
    (tmp_path / "dup.json").write_text(json.dumps(recs + [{**r, "score": 0.5} for r in recs]))
    raw = cfg_for(unlabeled, gt_path)
    clean = raw.model_copy(update={"loss": raw.loss.model_copy(update={"pseudo_label_overlaps": "exclusive"})})
    before, after = (pseudo_label_rows(c, "teacher", tmp_path / "dup.json")["pseudo_labels"]["teacher"]
                     for c in (raw, clean))
    assert (before["quality"]["pseudo_labels"], before["quality"]["precision"]) == (8, 0.5)
    assert (after["quality"]["pseudo_labels"], after["quality"]["precision"]) == (4, 1.0)
    assert after["AP"] == before["AP"]


QUALITY = {"score_threshold": 0.3, "pseudo_labels": 8, "truth": 10, "matched": 4, "precision": 0.5,
           "recall": 0.4, "merged": 2, "off_target": 1}
PSEUDO = {"ground_truth": "splits/unlabeled_gt.json", "num_images": 6,
          "adapt_a": {"AP": 0.125, "AP50": 0.5, "file": "pl/adapt_a.json", "quality": QUALITY},
          "teacher": {"AP": 0.25, "AP50": 0.625, "file": "pl/teacher.json"}}  # a run from before "quality"


def test_demo_table_shows_pseudo_labels_and_premise():
    metrics = {"teacher_adapted": {"AP": 0.3, "AP50": 0.6}, "student_supervised": {"AP": 0.2, "AP50": 0.4},
               "pseudo_labels": PSEUDO}
    lines = results_table(metrics).splitlines()
    assert lines[-5].split() == ["pseudo-labels", "adapt/a", "*", "12.50", "50.00", "—", "—"]
    assert lines[-4].split() == ["pseudo-labels", "adapt/c", "*", "25.00", "62.50", "—", "—"]
    assert lines[-3].startswith("* pseudo-labels on the 6 unlabeled images")
    assert lines[-2] == "  adapt/a: precision 0.50, recall 0.40, 25 % merge ≥ 2 instances (score ≥ 0.3)"
    assert lines[-1] == "premise: adapted teacher / supervised-only student = 1.50x (CAST needs > 1)"
    zero = results_table({"teacher_adapted": {"AP": 0.3, "AP50": 0.6}, "student_supervised": {"AP": 0.0, "AP50": 0.0}})
    assert zero.splitlines()[-1].endswith("= — (the supervised-only AP is 0)")


def test_report_shows_pseudo_labels_and_premise(tmp_path):
    metrics = {"teacher_adapted": {"AP": 0.3, "AP50": 0.6}, "student_supervised": {"AP": 0.2, "AP50": 0.4},
               "pseudo_labels": PSEUDO}
    md, page = write_report(tmp_path, metrics)
    text = md.read_text()
    assert "premise: adapted teacher / supervised-only student = 1.50x (CAST needs > 1)" in text
    assert ("| adapt/a | 0.125 | 0.500 | precision 0.50, recall 0.40, 25 % merge ≥ 2 instances (score ≥ 0.3) "
            "| pl/adapt_a.json |") in text
    assert "| adapt/c | 0.250 | 0.625 | — | pl/teacher.json |" in text
    assert "6 unlabeled images" in text
    doc = page.read_text()
    assert "1.50x (CAST needs &gt; 1)" in doc and "<td>adapt/c</td><td>0.250</td>" in doc
    md, _ = write_report(tmp_path, {"teacher_adapted": {"AP": 0.3, "AP50": 0.6}})
    assert "Pseudo-labels" not in md.read_text() and "= — (no supervised-only AP)" in md.read_text()


def test_a_wrong_class_count_fails_before_stage_1(tiny_run, capsys):
    """`model.num_classes` or the teacher's `class_names` that do not match the labeled data used
    to fail as a traceback at the first distillation step, after all of stage 1."""
    from castseg import cli

    base = ["run", str(tiny_run / "tiny.yaml"), "--runs", str(tiny_run / "runs")]
    assert cli.main([*base, "model.num_classes=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labeled.json: model.num_classes is 3, but the labeled data has 1 category (nucleus)" \
        in err[0] and "set model.num_classes: 1" in err[0], err
    assert cli.main([*base, "teacher.class_names=[nucleus,cell]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.class_names has 2 names, but the labeled data has 1 category (nucleus)" in err[0], err
    assert not (tiny_run / "runs" / "tiny" / "adapt").exists()  # nothing trained
