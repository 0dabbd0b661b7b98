"""What every run reports about its own premise and its pseudo-labels.

CAST helps only when the adapted teacher knows the target better than a student trained on the
labels alone, so each run records the *premise ratio* ``teacher_adapted AP / student_supervised
AP`` (CAST needs > 1). When the unlabeled images' own annotations are known (``castseg split``
sets them aside in ``unlabeled_gt.json``; config ``data.unlabeled_gt``), the cached pseudo-labels
are scored against them too: how good the targets the student learns from are. Those annotations
are read here only; no stage trains on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from castseg.data.coco_io import CocoData, load_coco, read_json
from castseg.errors import InputError
from castseg.layout import PSEUDO_LABEL_SOURCES  # metrics["pseudo_labels"] keys → the stage that made them

if TYPE_CHECKING:
    from castseg.config import RunConfig

PREMISE = "premise: adapted teacher / supervised-only student"


def premise_ratio(metrics: dict[str, Any]) -> float | None:
    """``teacher_adapted AP / student_supervised AP``; None when either is missing or undefined
    (COCO's -1) or the supervised AP is 0 (no ratio to speak of)."""
    teacher = (metrics.get("teacher_adapted") or {}).get("AP")
    student = (metrics.get("student_supervised") or {}).get("AP")
    if teacher is None or student is None or teacher < 0 or student <= 0:
        return None
    return teacher / student


def premise_text(metrics: dict[str, Any]) -> str:
    """One line for the printed table and the report."""
    ratio = premise_ratio(metrics)
    if ratio is not None:
        return f"{PREMISE} = {ratio:.2f}x (CAST needs > 1)"
    if (metrics.get("teacher_adapted") or {}).get("AP") is None:
        why = "no adapted-teacher AP"
    elif (metrics.get("student_supervised") or {}).get("AP") is None:
        why = "no supervised-only AP"
    else:
        why = "the supervised-only AP is 0"
    return f"{PREMISE} = — ({why})"


def check_classes(cfg: RunConfig) -> list[str]:
    """The labeled data's class names, checked before any stage trains against ``model.num_classes``
    and a teacher spec's ``class_names`` (one prompt per category): a wrong count used to surface
    as a traceback at the first distillation step, after all of stage 1."""
    if not cfg.data.labeled:
        return []
    names = load_coco(cfg.data.labeled, cfg.data.images_root).class_names
    shown = f"{len(names)} categor{'y' if len(names) == 1 else 'ies'} (" + ", ".join(names[:10]) \
        + (", ...)" if len(names) > 10 else ")")
    if cfg.model.num_classes != len(names):
        raise InputError(cfg.data.labeled, f"model.num_classes is {cfg.model.num_classes}, but the labeled data has "
                         f"{shown}; set model.num_classes: {len(names)}")
    given = getattr(cfg.teacher, "class_names", None)
    if given is not None and len(given) != len(names):
        raise InputError(cfg.data.labeled, f"teacher.class_names has {len(given)} names, but the labeled data has "
                         f"{shown}; give the teacher one name per category, in order")
    return names


def load_unlabeled_gt(cfg: RunConfig) -> CocoData | None:
    """``data.unlabeled_gt`` loaded and checked to hold exactly the unlabeled set's images
    (same ids and file names); None when the config has none."""
    from castseg.data.dataset import UnlabeledImageDataset

    data = cfg.data
    if not data.unlabeled_gt:
        return None
    path = Path(data.unlabeled_gt)
    if not path.is_file():
        raise InputError(path, "data.unlabeled_gt: no such file (expected the unlabeled images' own annotations, "
                         "e.g. castseg split's unlabeled_gt.json)")
    gt = load_coco(path, data.images_root)
    unlabeled = {i: name for i, name, _, _ in UnlabeledImageDataset(data.unlabeled, data.images_root,
                                                                     strong_view=False).items}
    ours = {img["id"]: img["file_name"] for img in gt.images}
    only_gt = sorted(i for i in ours if unlabeled.get(i) != ours[i])
    only_unl = sorted(i for i in unlabeled if ours.get(i) != unlabeled[i])
    if only_gt or only_unl:
        raise InputError(path, f"its images differ from the unlabeled set {data.unlabeled} ({len(only_gt)} image(s) "
                         f"only here, {len(only_unl)} only there; first ids {(only_gt or only_unl)[:5]}); "
                         f"data.unlabeled_gt must annotate exactly the unlabeled images")
    return gt


def _records(gt: CocoData, results: str | Path) -> list[dict[str, Any]]:
    """The COCO results list ``results``, checked to cover only images of ``gt``."""
    records = read_json(results)
    if not isinstance(records, list):
        raise InputError(results, "not a COCO results list")
    ids = {r["image_id"] for r in records if isinstance(r, dict) and isinstance(r.get("image_id"), int)}
    missing = sorted(ids - set(gt.image_by_id))
    if missing:
        raise InputError(results, f"{len(missing)} image id(s) are not images of the ground truth {gt.path} "
                         f"(first: {missing[:5]}); the pseudo-labels and the ground truth cover different images")
    return records


def pseudo_label_ap(gt: CocoData, results: str | Path | list[dict[str, Any]], max_dets: int) -> dict[str, float]:
    """Mask AP / AP50 of a pseudo-label cache (a COCO results file, or its records) against ``gt``."""
    from castseg.eval.coco_eval import evaluate_coco

    records = results if isinstance(results, list) else _records(gt, results)
    stats = evaluate_coco(gt, records, "segm", max_dets=max_dets)
    return {"AP": stats["AP"], "AP50": stats["AP50"]}


def pseudo_label_rows(cfg: RunConfig, key: str, results: str | Path) -> dict[str, Any]:
    """``{"pseudo_labels": {key: {AP, AP50, file, quality}, ground_truth, num_images}}`` when
    ``data.unlabeled_gt`` is set, else ``{}``. ``quality``: what L_semi's instances (score ≥
    ``loss.score_threshold``, cleaned as ``loss`` asks) get right and wrong
    (:mod:`castseg.eval.pseudo_label_quality`); AP is the teacher's, of the whole cache."""
    from castseg.eval.pseudo_label_quality import label_quality
    from castseg.pseudo_labels.clean import Cleanup, clean_records

    gt = load_unlabeled_gt(cfg)
    if gt is None:
        return {}
    records = _records(gt, results)
    threshold = cfg.loss.score_threshold
    quality = label_quality(gt, clean_records(records, Cleanup.from_loss(cfg.loss), threshold), threshold)
    return {"pseudo_labels": {"ground_truth": str(gt.path), "num_images": len(gt.images),
                              key: {**pseudo_label_ap(gt, records, cfg.eval.max_dets), "file": str(results),
                                    "quality": quality}}}


def quality_text(quality: dict[str, Any]) -> str:
    """``precision 0.42, recall 0.54, 26 % merge ≥ 2 instances (score ≥ 0.3)`` for the tables."""
    def rate(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    n = quality["pseudo_labels"]
    merged = f"{100 * quality['merged'] / n:.0f} %" if n else "—"
    return (f"precision {rate(quality['precision'])}, recall {rate(quality['recall'])}, {merged} merge ≥ 2 "
            f"instances (score ≥ {quality['score_threshold']:g})")


def merge_rows(metrics: dict[str, Any], rows: dict[str, Any]) -> dict[str, Any]:
    """``rows`` into ``metrics`` in place; the ``pseudo_labels`` entries of several stages merge."""
    for k, v in rows.items():
        if k == "pseudo_labels":
            metrics.setdefault(k, {}).update(v)
        else:
            metrics[k] = v
    return metrics


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json (``{}`` before the first stage finished); one line if unreadable."""
    if not Path(path).is_file():
        return {}
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise InputError(path, "not a castseg metrics file (top level is not an object)")
    return metrics
