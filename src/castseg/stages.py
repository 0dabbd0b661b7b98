"""CAST's three stages on one engine: adapt → distill → refine, plus the supervised baseline.

Every stage is a call of :func:`train_stage` (one :class:`~castseg.engine.Trainer` on the
objective the model brings, :mod:`castseg.trainable`); nothing reaches back. :func:`run_stages`
is the one runner every entry point uses (``castseg run | adapt | distill | refine``, the Python
API, the demo). The run folder's layout is :class:`castseg.layout.RunLayout`.

Stages receive the typed :class:`~castseg.config.RunConfig` and return their metrics rows;
they never ask what kind of model they train. A student-architecture teacher (a castseg
checkpoint, e.g. a pretrained stand-in) is trained in stage 1 on the same J as the student, as
in the paper; Grounding DINO + SAM2 or an ensemble on its own loss.

Re-running in the same ``run_dir`` reuses finished stages and resumes interrupted ones whose
settings match. Each stage records what it learnt from (:func:`stage_inputs`, and the hash of
its initial weights), so a stage after a redone one differs too: ``resume=True`` refuses a
changed stage, ``resume="auto"`` sets it aside (``<stage>.stale-<n>``, likewise a pseudo-label
cache made by another teacher) and redoes it.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from castseg import run_checks
from castseg.config import RunConfig
from castseg.data.coco_io import write_json
from castseg.data.dataset import CocoInstanceDataset, collate_instances
from castseg.data.split import sha256_file
from castseg.data.transforms import WeakView
from castseg.engine import BatchStream, Trainer, unwrap_model
from castseg.engine.checkpointing import weights_sha256, write_dir_atomic
from castseg.engine.data import loader_settings
from castseg.engine.optim import set_cuda_math
from castseg.engine.distributed import DistInfo, barrier, init_distributed, on_main
from castseg.errors import CastsegError, InputError
from castseg.layout import ADAPT_A, ADAPT_C, DISTILL, REFINE, STAGES, SUPERVISED, RunLayout
from castseg.models import build_student, load_checkpoint
from castseg.models.teacher_factory import build_teacher
from castseg.pseudo_labels import PseudoLabeledDataset, generate_pseudo_labels, load_teacher, read_manifest
from castseg.pseudo_labels.cache import IDENTITY_KEYS
from castseg.pseudo_labels.clean import CLEANUP_KEYS, Cleanup
from castseg.recommendation import recommend
from castseg.teacher_selection import holdout_config, log_selection, select_teacher, write_zero_shot_teacher
from castseg.trainable import CastTrainable, Trainable, trainable_for

Metrics = dict[str, Any]
logger = logging.getLogger(__name__)


def stage_inputs(cfg: RunConfig, lambda_semi: float, lambda_pxl: float, pseudo_labels: Path | None) -> dict[str, Any]:
    """What a stage learns from besides its train config and initial weights, for the Trainer
    to compare with an earlier run's: files by content (not path: a moved file is the same
    data), the view, eval and loss settings it uses, and the pseudo-labels' identity (teacher,
    images, options: a retrained teacher's cache is another one)."""
    data, loss = cfg.data, cfg.loss
    used = ["num_points"] + (["temperature", "num_negatives", "sampler", "max_anchors"] if lambda_pxl > 0 else []) \
        + (["score_threshold", "weight_by_score"] if lambda_semi > 0 else []) \
        + (CLEANUP_KEYS if lambda_semi > 0 and Cleanup.from_loss(loss).active else [])
    views = data.model_dump(mode="json", exclude={"labeled", "unlabeled", "val", "unlabeled_gt", "images_root"})
    if data.val and not Path(data.val).is_file():  # found now rather than after the stage's training
        raise InputError(data.val, "data.val: no such file (expected a COCO instances json)")
    out = {"labeled": sha256_file(data.labeled), "val": sha256_file(data.val) if data.val else None,
           "data": views, "eval": cfg.eval.to_dict(), "lambda_semi": lambda_semi, "lambda_pxl": lambda_pxl,
           "loss": {k: getattr(loss, k) for k in used}}
    if lambda_semi > 0 and pseudo_labels is not None:
        manifest = read_manifest(pseudo_labels)
        out["pseudo_labels"] = {k: manifest.get(k) for k in IDENTITY_KEYS}
    return out


def _streams(cfg: RunConfig, batch_size: int, workers: int | str, strong: bool, lambda_semi: float,
             pseudo_labels: Path | None, name: str) -> dict[str, BatchStream]:
    data, loss = cfg.data, cfg.loss
    loading = loader_settings(workers, run_dist(cfg).device)
    weak = WeakView(crop_size=data.crop_size, scale_range=data.scale_range, hflip=data.hflip, vflip=data.vflip,
                    invert=data.invert, tint=data.tint, stain=data.stain)
    collate = functools.partial(collate_instances, size_divisibility=data.size_divisibility)
    labeled = CocoInstanceDataset(data.labeled, data.images_root, transform=weak, strong_view=strong)
    streams = {"labeled": BatchStream(labeled, batch_size, collate_fn=collate, **loading)}
    if lambda_semi > 0:
        if pseudo_labels is None:
            raise CastsegError(f"stage {name}: λ_semi > 0 needs pseudo-labels of the unlabeled set")
        ds = PseudoLabeledDataset(data.unlabeled, pseudo_labels, score_threshold=loss.score_threshold,
                                  transform=weak, strong_view=strong, weight_by_score=loss.weight_by_score,
                                  images_root=data.images_root, cleanup=Cleanup.from_loss(loss))
        streams["unlabeled"] = BatchStream(ds, data.unlabeled_batch_size or batch_size, collate_fn=collate,
                                           **loading)
    return streams


def train_stage(name: str, model: Trainable, cfg: RunConfig, run_dir: Path | RunLayout, class_names: list[str],
                lambda_semi: float, lambda_pxl: float, pseudo_labels: Path | None = None,
                section: str | None = None, resume: bool | str = True) -> dict[str, Any]:
    """Train ``model`` in place on J(D_l, D_u; λ_semi, λ_pxl) with the train overrides of
    ``section`` (default: the stage name's first part) and return the Trainer's result (``val``:
    the final val metrics, ``checkpoint``: the model in a form ``load_teacher`` and
    ``castseg.load`` read). ``resume``: see :meth:`castseg.engine.Trainer.fit`."""
    layout = RunLayout.of(run_dir)
    tc = cfg.stage_train(section or name.split("/")[0])
    if not model.supports_pxl:
        lambda_pxl = 0.0
    strong = lambda_pxl > 0 and cfg.data.strong_view
    streams = _streams(cfg, tc.batch_size, tc.num_workers, strong, lambda_semi, pseudo_labels, name)
    trainer = Trainer(model.module(), model.loss_fn(class_names, cfg.loss, lambda_semi, lambda_pxl), streams, tc,
                      layout.stage(name), evaluate_fn=model.evaluator(cfg), name=name, class_names=class_names,
                      run_config=cfg.to_dict(), inputs=stage_inputs(cfg, lambda_semi, lambda_pxl, pseudo_labels))
    result = trainer.fit(resume=resume)
    _debug_rank_weights(trainer, name)
    if model.saves:  # e.g. Grounding DINO + SAM2: its own folder format beside the checkpoints
        folder = layout.teacher_folder(name)
        if trainer.dist.is_main:  # written whole or not at all: a reader never sees half a teacher
            write_dir_atomic(folder, lambda tmp: model.save(trainer.model, tmp))
        barrier(trainer.dist)  # every rank reads this folder next (stage 1b's pseudo-labels)
        result = {**result, "checkpoint": str(folder)}
    return result


def run_dist(cfg: RunConfig) -> DistInfo:
    """This process's place in the job and its device (``train.device``; under torchrun each
    rank's own GPU), joining the process group with the backend that device needs. On CUDA,
    TF32 follows ``train.tf32`` and cuDNN picks its algorithms once per shape when the
    training crops are fixed (``data.crop_size``)."""
    info = init_distributed(cfg.train.device)
    set_cuda_math(info.device, tf32=cfg.train.tf32, fixed_shapes=cfg.data.crop_size is not None)
    return info


def _debug_rank_weights(trainer: Trainer, name: str) -> None:
    """Opt-in test hook: with ``CASTSEG_DEBUG_RANK_WEIGHTS_DIR`` set, every rank writes the sha256
    of its final weights (state_dict tensors in sorted key order) to
    ``<dir>/<stage, '/' → '_'>.rank<k>.sha256``, so tests can check DDP ranks stayed in sync."""
    out = os.environ.get("CASTSEG_DEBUG_RANK_WEIGHTS_DIR")
    if not out:
        return
    digest = weights_sha256(unwrap_model(trainer.model))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name.replace('/', '_')}.rank{trainer.dist.rank}.sha256").write_text(digest + "\n")


def _row(result: dict[str, Any]) -> dict[str, Any]:
    val = result.get("val") or {}
    ckpt = Path(result["checkpoint"]) if result.get("checkpoint") else None
    return {"AP": val.get("AP"), "AP50": val.get("AP50"), "checkpoint": str(ckpt) if ckpt else None}


def initial_student(cfg: RunConfig) -> torch.nn.Module:
    """θ_s⁰: the configured student, with ``model.init_from``'s weights when given (loaded
    strictly: an architecture that differs from the checkpoint's is one clear error)."""
    torch.manual_seed(cfg.train.seed)  # the same θ_s⁰ for the CAST student and the baseline
    student = build_student(cfg.model)
    if cfg.model.init_from:
        source, _ = load_checkpoint(cfg.model.init_from)
        try:
            student.load_state_dict(source.state_dict())
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise CastsegError(f"model.init_from {cfg.model.init_from}: its architecture differs from the "
                               f"configured model ({first})") from None
    return student


def initial_teacher(cfg: RunConfig) -> tuple[Any, list[str]]:
    """θ_T⁰ from the ``teacher`` section — built afresh on every call, which is how stage 1c
    re-initialises — and the class names it is trained on."""
    if cfg.teacher is None:
        raise CastsegError("config: the run needs a teacher section (e.g. teacher: {type: checkpoint, path: P})")
    teacher = build_teacher(cfg.teacher).to(run_dist(cfg).device).train()
    return teacher, teacher.class_names or _class_names(cfg)


def pseudo_label(teacher_path: str | Path, cfg: RunConfig, out: Path, resume: bool | str = True) -> Path:
    """Run a frozen teacher once over D_u into a cached COCO results file (resumable; a cache
    by another teacher is refused, or set aside with ``resume="auto"``, redone with False)."""
    opts = cfg.pseudo_labels
    device = run_dist(cfg).device
    teacher, info = load_teacher(teacher_path, device=device)
    if opts.tta:  # e.g. [h, v]: the teacher on flipped views, fused (castseg.models.tta)
        from castseg.models.tta import with_tta

        teacher, info = with_tta(teacher, info, opts.tta)
    generate_pseudo_labels(teacher, cfg.data.unlabeled, out, teacher_info=info, images_root=cfg.data.images_root,
                           max_size=opts.max_size, overwrite=resume is False, restart_changed=resume == "auto",
                           num_workers=loader_settings(cfg.train.num_workers, device)["num_workers"])
    return out


def evaluate_teacher(teacher: Any, cfg: RunConfig, label: str) -> dict[str, Any]:
    """Val AP / AP50 of a teacher as built (θ_T⁰: the zero-shot row), on the run's device, by
    rank 0 alone (the other ranks wait and get its row)."""
    def run() -> dict[str, Any]:
        trainable = trainable_for(teacher)
        evaluate = trainable.evaluator(cfg)
        stats = evaluate(trainable.module()) if evaluate is not None else {}
        return {"AP": stats.get("AP"), "AP50": stats.get("AP50"), "checkpoint": label}

    return on_main(run, run_dist(cfg))


def evaluate_checkpoint(path: str | Path, cfg: RunConfig) -> dict[str, Any]:
    """Val AP / AP50 of a saved model or teacher (anything ``load_teacher`` reads)."""
    teacher, _ = load_teacher(path, device=run_dist(cfg).device, fingerprint=False)
    return evaluate_teacher(teacher, cfg, str(path))


def run_adapt(cfg: RunConfig, run_dir: Path | RunLayout, resume: bool | str = True) -> tuple[Path, Metrics]:
    """Stage 1: (a) θ_T' on D_l with λ_pxl; (b) pseudo-label D_u with θ_T'; (c) θ_T'' from θ_T⁰
    on D_l + pseudo-labelled D_u. Returns the teacher stage 2 distils from (θ_T'', or with
    ``adapt.teacher_selection: best`` the best on val of θ_T⁰, θ_T', θ_T'':
    :mod:`castseg.teacher_selection`) and the stage's metrics rows."""
    layout = RunLayout.of(run_dir)
    info = run_dist(cfg)
    metrics: Metrics = {}
    val = "data.val"
    if cfg.adapt.teacher_selection == "best" and not cfg.data.val:
        cfg, val = on_main(lambda: _holdout(cfg, layout), info)
        cfg = RunConfig.model_validate(cfg)
        logger.info(f"teacher selection: {val}")
    teacher, names = initial_teacher(cfg)
    label = getattr(cfg.teacher, "path", None) or "teacher config"  # an ensemble has no one path
    metrics["teacher_zero_shot"] = evaluate_teacher(teacher, cfg, label)
    a = train_stage(ADAPT_A, trainable_for(teacher), cfg, layout, names, 0.0, cfg.loss.lambda_pxl, resume=resume)
    metrics["teacher_adapted_a"] = _row(a)
    pl = pseudo_label(a["checkpoint"], cfg, layout.pseudo_labels("adapt_a"), resume)
    run_checks.merge_rows(metrics, pseudo_label_rows(cfg, "adapt_a", pl))
    teacher, names = initial_teacher(cfg)  # re-initialised from θ_T⁰, not from θ_T'
    c = train_stage(ADAPT_C, trainable_for(teacher), cfg, layout, names, 1.0, cfg.loss.lambda_pxl,
                    pseudo_labels=pl, resume=resume)
    metrics["teacher_adapted"] = _row(c)
    paths = {"adapt_a": str(a["checkpoint"]), "adapt_c": str(c["checkpoint"])}
    if cfg.adapt.teacher_selection == "best":
        paths["zero_shot"] = on_main(lambda: write_zero_shot_teacher(cfg, layout), info)
    row = select_teacher(metrics, paths, cfg.adapt.teacher_selection, val)
    if info.is_main:
        log_selection(row)
    metrics["teacher_selection"] = row
    return Path(row["checkpoint"]), metrics


def _holdout(cfg: RunConfig, layout: RunLayout) -> tuple[dict[str, Any], str]:
    held, note = holdout_config(cfg, layout)
    return held.to_dict(), note


def run_distill(cfg: RunConfig, run_dir: Path | RunLayout, teacher_path: str | Path, resume: bool | str = True
                ) -> tuple[torch.nn.Module, Metrics]:
    """Stage 2: frozen θ_T'' pseudo-labels D_u once; the student trains on J(λ_semi, λ_pxl)."""
    pl = pseudo_label(teacher_path, cfg, RunLayout.of(run_dir).pseudo_labels("teacher"), resume)
    metrics = pseudo_label_rows(cfg, "teacher", pl)
    student, row = distill_from_cache(cfg, run_dir, pl, resume)
    return student, {**metrics, **row}


def distill_from_cache(cfg: RunConfig, run_dir: Path | RunLayout, pseudo_labels: Path, resume: bool | str = True
                       ) -> tuple[torch.nn.Module, Metrics]:
    """Stage 2's training alone: θ_s⁰ on J(λ_semi, λ_pxl) with an existing pseudo-label cache."""
    student = initial_student(cfg)
    r = train_stage(DISTILL, CastTrainable(student), cfg, run_dir, _class_names(cfg), cfg.loss.lambda_semi,
                    cfg.loss.lambda_pxl, pseudo_labels=pseudo_labels, resume=resume)
    return student, {"student_distilled": _row(r)}


def run_refine(cfg: RunConfig, run_dir: Path | RunLayout, student: torch.nn.Module, resume: bool | str = True,
               key: str = "student_refined", name: str = REFINE) -> Metrics:
    """Stage 3 (and, with ``name="supervised"``, the supervised-only baseline): J(D_l, ∅; 0, 0)
    from ``student`` with the budget of the ``<name>`` section (:meth:`RunConfig.stage_train`)."""
    r = train_stage(name, CastTrainable(student), cfg, run_dir, _class_names(cfg), 0.0, 0.0, resume=resume)
    return {key: _row(r)}


def pseudo_label_rows(cfg: RunConfig, key: str, cache: Path) -> Metrics:
    """:func:`castseg.run_checks.pseudo_label_rows`, computed by rank 0 alone."""
    return on_main(lambda: run_checks.pseudo_label_rows(cfg, key, cache), run_dist(cfg))


def _class_names(cfg: RunConfig) -> list[str]:
    from castseg.data.coco_io import load_coco

    return load_coco(cfg.data.labeled, cfg.data.images_root).class_names


def run_all(cfg: RunConfig, run_dir: Path | RunLayout, resume: bool | str = True, report: bool = True,
            checked: bool = False) -> Metrics:
    """All of CAST plus the supervised-only student from θ_s⁰ (with the ``supervised`` budget,
    stage 3's when unset), the premise ratio and (with ``data.unlabeled_gt``) the pseudo-labels'
    AP (:mod:`castseg.run_checks`). Under torchrun every rank trains; rank 0 alone evaluates
    teachers, scores pseudo-labels and writes metrics.json and the report."""
    info = run_dist(cfg)
    layout = RunLayout.of(run_dir)
    if not checked:
        check_data(cfg, "run")
    metrics: Metrics = {}

    def save() -> None:
        if info.is_main:
            write_json(metrics, layout.metrics, indent=1)

    teacher, rows = run_adapt(cfg, layout, resume)
    run_checks.merge_rows(metrics, rows)
    save()
    student, rows = run_distill(cfg, layout, teacher, resume)
    run_checks.merge_rows(metrics, rows)
    save()
    metrics.update(run_refine(cfg, layout, copy.deepcopy(student), resume))
    metrics.update(run_refine(cfg, layout, initial_student(cfg), resume, key="student_supervised",
                              name=SUPERVISED))
    metrics["premise_ratio"] = run_checks.premise_ratio(metrics)
    save()
    if report:
        metrics.update(on_main(lambda: _hand_over(cfg, layout, metrics), info))
    else:
        metrics["recommendation"] = recommend(metrics)
    save()
    return metrics


def _hand_over(cfg: RunConfig, layout: RunLayout, metrics: Metrics) -> dict[str, Any]:
    """Rank 0: the efficiency rows (params, GFLOPs, latency on the run's device), the recommended
    student exported to ``deploy/`` and report.md / report.html, which end with it."""
    from castseg.recommendation import recommendation_text, write_deploy
    from castseg.report import write_report
    from castseg.report_extras import report_extras

    efficiency, overlays = report_extras(cfg, metrics, device=str(run_dist(cfg).device))
    rec = recommend({**metrics, "efficiency": efficiency}, layout)
    if rec is not None:
        rec["files"] = write_deploy(rec, layout, size=min(512, cfg.val_max_size or 512))
        logger.info(recommendation_text(rec))
    out = {"efficiency": efficiency, "recommendation": rec}
    write_report(layout.root, {**metrics, **out}, efficiency, stages=STAGES, overlays=overlays,
                 title=f"castseg run: {layout.root.name}")
    return out


def run_stages(verb: str, cfg: RunConfig, run_dir: Path | RunLayout, resume: bool | str = True, *,
               teacher: str | Path | None = None, pseudo_labels: str | Path | None = None,
               init: str | Path | None = None, report: bool = True,
               on_start: Callable[[], None] | None = None) -> Metrics:
    """The one stage runner: ``verb`` ``"run"`` (:func:`run_all`: a fresh metrics.json) or
    ``"adapt"`` / ``"distill"`` / ``"refine"`` (one stage, its rows merged into the run's
    metrics.json). ``distill`` learns from ``teacher`` (default: this run's adapted teacher) or
    an existing ``pseudo_labels`` cache; ``refine`` starts from ``init`` (default: this run's
    distilled student). The data checks run before anything else, then ``on_start`` (e.g. the
    plan's summary), then the stages. Returns the run's metrics."""
    layout = RunLayout.of(run_dir)
    check_data(cfg, verb)
    if on_start is not None:
        on_start()
    if verb == "run":
        return run_all(cfg, layout, resume, report=report, checked=True)
    metrics: Metrics = run_checks.read_metrics(layout.metrics)
    if verb == "adapt":
        run_checks.merge_rows(metrics, run_adapt(cfg, layout, resume)[1])
    elif verb == "distill" and pseudo_labels is not None:
        cache = Path(pseudo_labels)
        run_checks.merge_rows(metrics, pseudo_label_rows(cfg, "imported", cache))
        run_checks.merge_rows(metrics, distill_from_cache(cfg, layout, cache, resume)[1])
    elif verb == "distill":
        chosen = (metrics.get("teacher_selection") or {}).get("checkpoint")  # stage 1's choice, if it made one
        source = Path(teacher or chosen or layout.trained_model(ADAPT_C))
        if not source.exists():
            raise CastsegError(f"{source}: no adapted teacher; run `castseg adapt` first or pass --teacher")
        run_checks.merge_rows(metrics, run_distill(cfg, layout, source, resume)[1])
    elif verb == "refine":
        start = Path(init) if init else layout.checkpoint(DISTILL)
        if not start.exists():
            raise CastsegError(f"{start}: no distilled student; run `castseg distill` first or pass --init")
        metrics.update(run_refine(cfg, layout, load_checkpoint(start)[0].train(), resume))
    else:
        raise ValueError(f"unknown verb {verb!r} (run, adapt, distill, refine)")
    if run_dist(cfg).is_main:
        write_json(metrics, layout.metrics, indent=1)
    return metrics


def check_data(cfg: RunConfig, verb: str) -> None:
    """What can be checked before any training, checked: a wrong class count fails now, not at
    distillation's first step; a wrong ``data.unlabeled_gt`` not after stage 1."""
    run_checks.check_classes(cfg)
    if verb != "refine":
        run_checks.load_unlabeled_gt(cfg)
