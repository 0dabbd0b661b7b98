"""`castseg distill --pseudo-labels`: stage 2 from a cache made elsewhere, no teacher run."""

from __future__ import annotations

import json

from castseg import cli
from castseg.engine.checkpointing import STATE_JSON


def test_distill_from_an_imported_cache(tiny_run, capsys):
    """The unlabeled images' own labels imported as the cache: stage 2 trains on it, scores it
    against the same labels (AP 1, nothing merged) and never runs a teacher."""
    root, splits = tiny_run, tiny_run / "splits"
    cache = root / "gt_cache.json"
    assert cli.main(["pseudo-label", "--predictions", str(splits / "unlabeled_gt.json"),
                     "--images", str(splits / "unlabeled.json"), "--out", str(cache)]) == 0
    assert cli.main(["distill", str(root / "tiny.yaml"), "train.max_steps=2", "--runs", str(root / "runs"),
                     "--pseudo-labels", str(cache), "--unlabeled-gt", str(splits / "unlabeled_gt.json")]) == 0
    run = root / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student_distilled"]["AP"] is not None
    assert json.loads((run / "distill" / "checkpoints" / "last" / STATE_JSON).read_text())["step"] == 2
    row = metrics["pseudo_labels"]["imported"]
    assert row["file"] == str(cache) and row["AP"] == 1.0
    assert row["quality"]["precision"] == row["quality"]["recall"] == 1.0 and row["quality"]["merged"] == 0
    assert not (run / "pseudo_labels").exists()  # no teacher pass
    assert "pseudo-labels of given cache: AP 1.000" in capsys.readouterr().out

    code = cli.main(["distill", str(root / "tiny.yaml"), "--runs", str(root / "runs2"),
                     "--pseudo-labels", str(root / "missing.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "missing.json" in err[0] and "manifest" in err[0]


def test_summary_prints_each_model_the_pseudo_labels_and_the_premise_of_whole_runs(capsys):
    from castseg.commands.pipeline import print_summary

    quality = {"score_threshold": 0.3, "pseudo_labels": 4, "truth": 5, "matched": 2, "precision": 0.5,
               "recall": 0.4, "merged": 1, "off_target": 1}
    metrics = {"teacher_adapted": {"AP": 0.3, "AP50": 0.6, "checkpoint": "adapt/c/checkpoints/last"},
               "student_supervised": {"AP": 0.2, "AP50": 0.4}, "student_refined": {"AP": None},
               "pseudo_labels": {"ground_truth": "gt.json", "num_images": 6,
                                 "teacher": {"AP": 0.25, "AP50": 0.5, "quality": quality}}}
    print_summary(metrics, with_premise=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[:2]] == [["teacher_adapted", "AP", "0.300"],
                                                      ["student_supervised", "AP", "0.200"]]
    assert lines[0].endswith("adapt/c/checkpoints/last")
    assert lines[2] == "  pseudo-labels of adapt/c: AP 0.250  AP50 0.500 on the 6 unlabeled images (gt.json)"
    assert lines[3] == "    precision 0.50, recall 0.40, 25 % merge ≥ 2 instances (score ≥ 0.3)"
    assert lines[4] == "  premise: adapted teacher / supervised-only student = 1.50x (CAST needs > 1)"
    print_summary(metrics, with_premise=False)  # a single stage has no premise to state
    assert "premise" not in capsys.readouterr().out
