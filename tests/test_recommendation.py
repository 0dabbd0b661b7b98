"""The student a run recommends and the one line that reads its table."""

from __future__ import annotations

import pytest

from castseg.recommendation import reading, recommend, recommendation_text


def metrics(teacher, supervised, refined):
    return {"teacher_adapted": {"AP": teacher}, "student_supervised": {"AP": supervised, "checkpoint": "s"},
            "student_refined": {"AP": refined, "checkpoint": "r"},
            "efficiency": {"student (refined)": {"latency_ms": 12.0}}}


@pytest.mark.parametrize("aps, model, says", [
    ((0.30, 0.10, 0.14), "student_refined", "premise met (teacher 30.00 vs supervised-only 10.00 AP); CAST beat "
                                            "supervised-only here (+4.00 AP); more unlabeled"),
    ((0.30, 0.14, 0.10), "student_supervised", "CAST did not beat supervised-only here (-4.00 AP); with the "
                                               "premise met, longer distillation"),
    ((0.10, 0.14, 0.12), "student_supervised", "premise not met (teacher 10.00 vs supervised-only 14.00 AP)"),
])
def test_the_better_student_is_recommended_with_a_reading(aps, model, says):
    rec = recommend(metrics(*aps))
    assert rec["model"] == model and says in rec["reading"] and rec["latency_ms"] == 12.0
    best = max(aps[1:])
    assert rec["AP"] == best and rec["gap_to_teacher"] == pytest.approx(aps[0] - best)
    assert recommendation_text(rec).startswith(f"deploy: {rec['label']} ({100 * best:.2f} AP, ")


def test_no_val_no_recommendation():
    assert recommend({"student_refined": {"AP": None}}) is None
    assert "nothing to read" in reading({})


def test_the_premise_is_read_on_the_teacher_distilled_from():
    m = metrics(0.10, 0.14, 0.12)
    m["teacher_selection"] = {"chosen": "zero_shot", "val_ap": {"zero_shot": 0.20, "adapt_a": 0.05, "adapt_c": 0.10}}
    rec = recommend(m)
    assert "premise met (teacher 20.00 vs supervised-only 14.00 AP)" in rec["reading"]
    assert rec["gap_to_teacher"] == pytest.approx(0.20 - 0.14)
