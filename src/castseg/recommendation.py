"""The model a run hands over: the student to deploy, exported, and one line reading the table.

A run scores five models; a user wants one. :func:`recommend` names the student with the best val
AP — the CAST-refined one or the supervised-only one, whichever is better *here* — with its
latency and its gap to the teacher, and :func:`reading` says in one line whether CAST's premise
held, whether CAST beat supervised-only and what would change the outcome. :func:`write_deploy`
puts that student in ``runs/NAME/deploy/`` (checkpoint + ONNX).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from castseg.layout import RunLayout

logger = logging.getLogger(__name__)

STUDENTS = (("student_refined", "student, CAST refined"), ("student_supervised", "student, supervised only"))


def _ap(metrics: dict[str, Any], key: str) -> float | None:
    ap = (metrics.get(key) or {}).get("AP")
    return ap if isinstance(ap, (int, float)) and ap >= 0 else None


def _teacher_ap(metrics: dict[str, Any]) -> float | None:
    """Val AP of the teacher the student learnt from: stage 1's choice where it made one
    (:mod:`castseg.teacher_selection`), else θ_T''."""
    sel = metrics.get("teacher_selection")
    if isinstance(sel, dict) and isinstance((sel.get("val_ap") or {}).get(sel.get("chosen")), (int, float)):
        return sel["val_ap"][sel["chosen"]]
    return _ap(metrics, "teacher_adapted")


def reading(metrics: dict[str, Any]) -> str:
    """One line: is the premise met, did CAST beat supervised-only here, what would change it."""
    teacher, sup, cast = _teacher_ap(metrics), _ap(metrics, "student_supervised"), _ap(metrics, "student_refined")
    if None in (teacher, sup, cast):
        return "no val AP for every model: nothing to read (give data.val)"
    premise = teacher > sup
    gain = 100 * (cast - sup)
    head = (f"premise {'met' if premise else 'not met'} (teacher {100 * teacher:.2f} vs supervised-only "
            f"{100 * sup:.2f} AP); CAST {'beat' if gain > 0 else 'did not beat'} supervised-only here "
            f"({gain:+.2f} AP)")
    if not premise:
        return head + "; CAST needs a teacher that knows the target better than the labels alone teach the student " \
                      "(a stronger or better-adapted teacher)"
    if gain <= 0:
        return head + "; with the premise met, longer distillation or cleaner pseudo-labels " \
                      "(loss.pseudo_label_overlaps, a higher loss.score_threshold) are what to try"
    return head + "; more unlabeled images or distillation steps may widen it"


def recommend(metrics: dict[str, Any], layout: RunLayout | None = None) -> dict[str, Any] | None:
    """``{"model", "label", "checkpoint", "AP", "gap_to_teacher", "latency_ms", "deploy",
    "reading"}`` for the better student on val (ties: the CAST-refined one); None when neither
    has a val AP."""
    scored = [(k, label, _ap(metrics, k)) for k, label in STUDENTS if _ap(metrics, k) is not None]
    if not scored:
        return None
    key, label, ap = max(scored, key=lambda r: r[2])  # max keeps the first (refined) on ties
    teacher = _teacher_ap(metrics)
    # both students share one architecture: the report's latency of the refined one is theirs
    latency = ((metrics.get("efficiency") or {}).get("student (refined)") or {}).get("latency_ms")
    return {"model": key, "label": label, "checkpoint": metrics[key].get("checkpoint"), "AP": ap,
            "gap_to_teacher": None if teacher is None else teacher - ap, "latency_ms": latency,
            "deploy": str(layout.deploy) if layout is not None else None, "reading": reading(metrics)}


def recommendation_text(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "recommendation: none (no student has a val AP; give data.val)"
    g = rec["gap_to_teacher"]
    gap = "" if g is None else f", {100 * abs(g):.2f} AP {'behind' if g >= 0 else 'ahead of'} the teacher"
    latency = "" if rec["latency_ms"] is None else f", {rec['latency_ms']:.1f} ms per val image"
    where = rec["deploy"] or rec["checkpoint"]
    return f"deploy: {rec['label']} ({100 * rec['AP']:.2f} AP{gap}{latency}) -> {where}"


def write_deploy(rec: dict[str, Any], layout: RunLayout, size: int = 512) -> dict[str, Any]:
    """Copy the recommended checkpoint to ``deploy/model`` and export ``deploy/model.onnx``
    (parity-checked at ``size``×``size``); returns the files written."""
    from castseg.engine.checkpointing import write_dir_atomic
    from castseg.models.checkpoint import read_checkpoint_meta
    from castseg.predictor import load

    _, weights, meta = read_checkpoint_meta(rec["checkpoint"])  # the model's files, not the trainer's state

    def fill(tmp: Path) -> None:
        for f in (meta, weights):
            shutil.copy2(f, tmp / f.name)

    model_dir = layout.deploy / "model"
    write_dir_atomic(model_dir, fill)
    onnx = load(model_dir, device="cpu").export(layout.deploy / "model.onnx", height=size, width=size)
    return {"checkpoint": str(model_dir), "onnx": str(onnx)}
