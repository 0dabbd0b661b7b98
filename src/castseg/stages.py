"""CAST's three stages on one engine: adapt → distill → refine, plus the supervised baseline.

Every stage is a call of :func:`train_stage` (one :class:`~castseg.engine.Trainer`, one
:class:`~castseg.objective.CastObjective` with the stage's λs); nothing reaches back. Layout of
``run_dir``: ``adapt/a``, ``adapt/c``, ``distill``, ``refine``, ``supervised`` (each a Trainer
folder), ``pseudo_labels/``, ``metrics.json``, ``report.md`` / ``report.html``.

Teachers here are student-architecture models (a castseg checkpoint, e.g. the ``large``
preset or a pretrained stand-in): stage 1 trains them on the same J as the student, as in the
paper. A Grounding DINO + SAM2 teacher is evaluated zero-shot and used for pseudo-labels as is.

Re-running in the same ``run_dir`` reuses finished stages and resumes interrupted ones whose
settings match. Each stage records what it learnt from (:func:`stage_inputs`, and the hash of
its initial weights), so a stage after a redone one differs too: ``resume=True`` refuses a
changed stage, ``resume="auto"`` sets it aside (``<stage>.stale-<n>``, likewise a pseudo-label
cache made by another teacher) and redoes it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch

from castseg import run_checks
from castseg.config import DataConfig, EvalConfig, train_config
from castseg.data.coco_io import write_json
from castseg.data.dataset import CocoInstanceDataset, collate_instances
from castseg.data.split import sha256_file
from castseg.data.transforms import WeakView
from castseg.engine import BatchStream, Trainer
from castseg.engine.checkpointing import weights_sha256
from castseg.errors import CastsegError, InputError
from castseg.evaluate import make_evaluator
from castseg.losses import HungarianMatcher, SetLoss
from castseg.losses.pixel_contrastive import PixelContrastiveLoss
from castseg.models import StudentConfig, build_student, load_checkpoint
from castseg.objective import CastObjective
from castseg.pseudo_labels import PseudoLabeledDataset, generate_pseudo_labels, load_teacher, read_manifest
from castseg.pseudo_labels.cache import IDENTITY_KEYS

# loss: section keys and their defaults (METHOD.md)
LOSS_DEFAULTS: dict[str, Any] = {
    "lambda_semi": 1.0, "lambda_pxl": 0.1, "temperature": 0.1, "num_negatives": 200, "sampler": "fused",
    "max_anchors": 1024, "num_points": 12544, "score_threshold": 0.3, "weight_by_score": False,
}


def loss_options(cfg: dict[str, Any]) -> dict[str, Any]:
    opts = {**LOSS_DEFAULTS, **(cfg.get("loss") or {})}
    unknown = set(opts) - set(LOSS_DEFAULTS)
    if unknown:
        raise CastsegError(f"config loss: unknown key(s) {sorted(unknown)}; valid: {sorted(LOSS_DEFAULTS)}")
    return opts


def stage_inputs(data: DataConfig, ev: EvalConfig, loss: dict[str, Any], lambda_semi: float, lambda_pxl: float,
                 pseudo_labels: Path | None) -> dict[str, Any]:
    """What a stage learns from besides its train config and initial weights, for the Trainer
    to compare with an earlier run's: files by content (not path: a moved file is the same
    data), the view, eval and loss settings it uses, and the pseudo-labels' identity (teacher,
    images, options: a retrained teacher's cache is another one)."""
    used = ["num_points"] + (["temperature", "num_negatives", "sampler", "max_anchors"] if lambda_pxl > 0 else []) \
        + (["score_threshold", "weight_by_score"] if lambda_semi > 0 else [])
    views = {k: v for k, v in data.to_dict().items() if k not in ("labeled", "unlabeled", "val", "unlabeled_gt",
                                                                    "images_root")}
    if data.val and not Path(data.val).is_file():  # found now rather than after the stage's training
        raise InputError(data.val, "data.val: no such file (expected a COCO instances json)")
    out = {"labeled": sha256_file(data.labeled), "val": sha256_file(data.val) if data.val else None,
           "data": views, "eval": ev.to_dict(), "lambda_semi": lambda_semi, "lambda_pxl": lambda_pxl,
           "loss": {k: loss[k] for k in used}}
    if lambda_semi > 0 and pseudo_labels is not None:
        manifest = read_manifest(pseudo_labels)
        out["pseudo_labels"] = {k: manifest.get(k) for k in IDENTITY_KEYS}
    return out


def build_objective(num_classes: int, loss: dict[str, Any], lambda_semi: float, lambda_pxl: float) -> CastObjective:
    n = int(loss["num_points"])
    pixel = PixelContrastiveLoss(temperature=loss["temperature"], num_negatives=loss["num_negatives"],
                                 sampler=loss["sampler"], max_anchors=loss["max_anchors"]) if lambda_pxl > 0 else None
    return CastObjective(SetLoss(num_classes, HungarianMatcher(num_points=n), num_points=n), pixel,
                         lambda_semi=lambda_semi, lambda_pxl=lambda_pxl)


def _stream(dataset, batch_size: int, data: DataConfig, workers: int) -> BatchStream:
    return BatchStream(dataset, batch_size, collate_fn=functools.partial(collate_instances,
                                                                         size_divisibility=data.size_divisibility),
                       num_workers=workers)


def train_stage(name: str, model: torch.nn.Module, cfg: dict[str, Any], run_dir: Path, class_names: list[str],
                lambda_semi: float, lambda_pxl: float, pseudo_labels: Path | None = None,
                stage_train: dict | None = None, resume: bool | str = True) -> dict[str, Any]:
    """Train ``model`` in place on J(D_l, D_u; λ_semi, λ_pxl) and return the Trainer's result
    (``val`` holds the final val metrics, ``checkpoint`` the model checkpoint folder).
    ``resume``: see :meth:`castseg.engine.Trainer.fit` (True, False or "auto")."""
    data = DataConfig.from_dict(cfg["data"], "config", "data")
    ev = EvalConfig.from_dict(cfg["eval"], "config", "eval")
    tc = train_config(cfg, stage_train, source=f"config ({name})")
    loss = loss_options(cfg)
    if is_composite_teacher(model):
        lambda_pxl = 0.0  # no pixel embeddings in Grounding DINO + SAM2 (see composite_teacher_loss)
    weak = WeakView(crop_size=data.crop_size, scale_range=data.scale_range, hflip=data.hflip, vflip=data.vflip,
                    invert=data.invert, tint=data.tint, stain=data.stain)
    strong = lambda_pxl > 0 and data.strong_view
    streams = {"labeled": _stream(CocoInstanceDataset(data.labeled, data.images_root, transform=weak,
                                                      strong_view=strong), tc.batch_size, data, tc.num_workers)}
    if lambda_semi > 0:
        if pseudo_labels is None:
            raise CastsegError(f"stage {name}: λ_semi > 0 needs pseudo-labels of the unlabeled set")
        ds = PseudoLabeledDataset(data.unlabeled, pseudo_labels, score_threshold=loss["score_threshold"],
                                  transform=weak, strong_view=strong, weight_by_score=loss["weight_by_score"],
                                  images_root=data.images_root)
        streams["unlabeled"] = _stream(ds, data.unlabeled_batch_size or tc.batch_size, data, tc.num_workers)
    if is_composite_teacher(model):
        loss_fn = composite_teacher_loss(class_names)
        evaluate = (lambda m: evaluate_teacher(m, cfg)) if data.val else None
    else:
        objective = build_objective(len(class_names), loss, lambda_semi, lambda_pxl)

        def loss_fn(m, batches, step):
            return objective(m, batches.get("labeled"), batches.get("unlabeled"), step=step)

        evaluate = make_evaluator(data.val, max_dets=ev.max_dets, batch_size=ev.batch_size, topk=ev.topk,
                                  max_size=ev.max_size or data.val_max_size, images_root=data.images_root) \
            if data.val else None
    inputs = stage_inputs(data, ev, loss, lambda_semi, lambda_pxl, pseudo_labels)
    trainer = Trainer(model, loss_fn, streams, tc, run_dir / name, evaluate_fn=evaluate, name=name,
                      class_names=class_names, run_config=cfg, inputs=inputs)
    result = trainer.fit(resume=resume)
    _debug_rank_weights(trainer, name)
    if is_composite_teacher(model) and trainer.dist.is_main:
        # The adapted teacher in its own format, loadable by pseudo-label / predict / distill.
        folder = run_dir / name / "teacher"
        model.save_pretrained(folder)
        result = {**result, "checkpoint": str(folder)}
    return result


def is_composite_teacher(model: torch.nn.Module) -> bool:
    from castseg.models.grounded_sam import GroundedSAMTeacher

    return isinstance(model, GroundedSAMTeacher)


def composite_teacher_loss(class_names: list[str]):
    """Stage-1 loss of the Grounding DINO + SAM2 teacher: its own detection loss + SAM2 mask
    BCE/Dice (:meth:`GroundedSAMTeacher.loss`) on labeled and pseudo-labelled batches. L_pxl
    needs pixel embeddings this teacher does not have, so λ_pxl does not apply to it."""
    def loss_fn(m, batches, step):
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for key, batch in batches.items():
            targets = [{"labels": t["labels"], "masks": t["masks"]} for t in batch["targets"]]
            out = m.loss(batch["images"], targets, class_names)
            total = total + out["loss"]
            terms.update({f"{key}_{k}": v.detach() for k, v in out.items() if k != "loss"})
        return {"loss": total, **terms}

    return loss_fn


def evaluate_teacher(teacher: torch.nn.Module, cfg: dict[str, Any]) -> dict[str, float]:
    """Mask AP of a composite teacher on the val set (its own predict path)."""
    from castseg.data.coco_io import load_coco
    from castseg.data.images import read_image
    from castseg.eval.coco_eval import evaluate_coco
    from castseg.models.inference import resize_masks, to_coco_results
    from castseg.predictor import resize_for_model

    data = DataConfig.from_dict(cfg["data"], "config", "data")
    ev = EvalConfig.from_dict(cfg["eval"], "config", "eval")
    val = load_coco(data.val, data.images_root)
    cat_ids = [c["id"] for c in val.categories]
    records = []
    for img in val.images:
        x = resize_for_model(read_image(val.image_path(img)), ev.max_size or data.val_max_size)[None]
        r = teacher.predict(x, val.class_names)[0]
        h, w = img["height"], img["width"]
        masks = resize_masks(r["masks"], (h, w))
        records += to_coco_results({**r, "masks": masks}, img["id"], cat_ids)
    return evaluate_coco(val, records, "segm", max_dets=ev.max_dets)


def _debug_rank_weights(trainer: Trainer, name: str) -> None:
    """Opt-in test hook: with ``CASTSEG_DEBUG_RANK_WEIGHTS_DIR`` set, every rank writes the sha256
    of its final weights (state_dict tensors in sorted key order) to
    ``<dir>/<stage, '/' → '_'>.rank<k>.sha256``, so tests can check DDP ranks stayed in sync."""
    import os

    out = os.environ.get("CASTSEG_DEBUG_RANK_WEIGHTS_DIR")
    if not out:
        return
    from castseg.engine import unwrap_model

    digest = weights_sha256(unwrap_model(trainer.model))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name.replace('/', '_')}.rank{trainer.dist.rank}.sha256").write_text(digest + "\n")


def _row(result: dict[str, Any]) -> dict[str, Any]:
    val = result.get("val") or {}
    ckpt = Path(result["checkpoint"]) if result.get("checkpoint") else None
    return {"AP": val.get("AP"), "AP50": val.get("AP50"), "checkpoint": str(ckpt) if ckpt else None}


def initial_student(cfg: dict[str, Any]) -> torch.nn.Module:
    """θ_s⁰: the configured student, with ``model.init_from``'s weights when given (loaded
    strictly: an architecture that differs from the checkpoint's is one clear error)."""
    torch.manual_seed(train_config(cfg).seed)  # the same θ_s⁰ for the CAST student and the baseline
    config = StudentConfig.from_dict(cfg["model"], "config model")
    student = build_student(config)
    if config.init_from:
        source, _ = load_checkpoint(config.init_from)
        try:
            student.load_state_dict(source.state_dict())
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise CastsegError(f"model.init_from {config.init_from}: its architecture differs from the configured "
                               f"model ({first})") from None
    return student


def initial_teacher(cfg: dict[str, Any]) -> tuple[torch.nn.Module, list[str]]:
    """θ_T⁰: the pretrained teacher (a castseg checkpoint) — loaded afresh on every call, which
    is how stage 1c re-initialises."""
    t = dict(cfg.get("teacher") or {})
    if t.get("type") == "grounded_sam":
        from castseg.models.teacher import build_teacher

        teacher = build_teacher(t)
        return teacher.train(), _class_names(cfg)
    if t.get("type", "checkpoint") != "checkpoint" or not t.get("path"):
        raise CastsegError("config teacher: set teacher.type: checkpoint with teacher.path (a castseg checkpoint), "
                           "or teacher.type: grounded_sam")
    model, meta = load_checkpoint(t["path"])
    return model.train(), list(meta["class_names"])


def pseudo_label(checkpoint: str | Path, cfg: dict[str, Any], out: Path, resume: bool | str = True) -> Path:
    """Run a frozen teacher once over D_u into a cached COCO results file (resumable; a cache
    by another teacher is refused, or set aside with ``resume="auto"``, redone with False)."""
    data = DataConfig.from_dict(cfg["data"], "config", "data")
    opts = cfg.get("pseudo_labels") or {}
    teacher, info = load_teacher(checkpoint)
    if opts.get("tta"):  # e.g. [h, v]: the teacher on flipped views, fused (castseg.models.tta)
        from castseg.models.tta import with_tta

        teacher, info = with_tta(teacher, info, opts["tta"])
    generate_pseudo_labels(teacher, data.unlabeled, out, teacher_info=info, images_root=data.images_root,
                           max_size=opts.get("max_size"), overwrite=resume is False,
                           restart_changed=resume == "auto")
    return out


def evaluate_checkpoint(path: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    data = DataConfig.from_dict(cfg["data"], "config", "data")
    ev = EvalConfig.from_dict(cfg["eval"], "config", "eval")
    model, _ = load_checkpoint(path)
    stats = make_evaluator(data.val, max_dets=ev.max_dets, batch_size=ev.batch_size, topk=ev.topk,
                           max_size=ev.max_size or data.val_max_size, images_root=data.images_root)(model)
    return {"AP": stats["AP"], "AP50": stats["AP50"], "checkpoint": str(path)}


def run_adapt(cfg: dict[str, Any], run_dir: Path, metrics: dict[str, Any], resume: bool | str = True) -> Path:
    """Stage 1: (a) θ_T' on D_l with λ_pxl; (b) pseudo-label D_u with θ_T'; (c) θ_T'' from θ_T⁰
    on D_l + pseudo-labelled D_u. Returns θ_T'''s checkpoint."""
    loss = loss_options(cfg)
    stage = cfg.get("adapt") or {}
    model, names = initial_teacher(cfg)
    if is_composite_teacher(model):
        stats = evaluate_teacher(model, cfg)
        metrics["teacher_zero_shot"] = {"AP": stats["AP"], "AP50": stats["AP50"], "checkpoint": "teacher config"}
    else:
        metrics["teacher_zero_shot"] = evaluate_checkpoint(cfg["teacher"]["path"], cfg)
    a = train_stage("adapt/a", model, cfg, run_dir, names, 0.0, loss["lambda_pxl"], stage_train=stage.get("train"),
                    resume=resume)
    metrics["teacher_adapted_a"] = _row(a)
    pl = pseudo_label(a["checkpoint"], cfg, run_dir / "pseudo_labels" / "adapt_a.json", resume)
    run_checks.record_pseudo_labels(cfg, metrics, "adapt_a", pl)
    model, names = initial_teacher(cfg)  # re-initialised from θ_T⁰, not from θ_T'
    c = train_stage("adapt/c", model, cfg, run_dir, names, 1.0, loss["lambda_pxl"], pseudo_labels=pl,
                    stage_train=stage.get("train"), resume=resume)
    metrics["teacher_adapted"] = _row(c)
    return Path(c["checkpoint"])


def run_distill(cfg: dict[str, Any], run_dir: Path, teacher_ckpt: str | Path, metrics: dict[str, Any],
                resume: bool | str = True) -> torch.nn.Module:
    """Stage 2: frozen θ_T'' pseudo-labels D_u once; the student trains on J(λ_semi, λ_pxl)."""
    loss = loss_options(cfg)
    pl = pseudo_label(teacher_ckpt, cfg, run_dir / "pseudo_labels" / "teacher.json", resume)
    run_checks.record_pseudo_labels(cfg, metrics, "teacher", pl)
    student = initial_student(cfg)
    names = _class_names(cfg)
    r = train_stage("distill", student, cfg, run_dir, names, loss["lambda_semi"], loss["lambda_pxl"],
                    pseudo_labels=pl, stage_train=(cfg.get("distill") or {}).get("train"), resume=resume)
    metrics["student_distilled"] = _row(r)
    return student


def run_refine(cfg: dict[str, Any], run_dir: Path, student: torch.nn.Module, metrics: dict[str, Any],
               resume: bool | str = True, key: str = "student_refined", name: str = "refine",
               section: str = "refine") -> torch.nn.Module:
    """Stage 3 (and the supervised baseline): J(D_l, ∅; 0, 0) from ``student``, with the budget
    of the config's ``<section>.train`` (stage 3's when that section is absent)."""
    stage = (cfg.get(section) or {}).get("train") or (cfg.get("refine") or {}).get("train")
    r = train_stage(name, student, cfg, run_dir, _class_names(cfg), 0.0, 0.0, stage_train=stage, resume=resume)
    metrics[key] = _row(r)
    return student


def _class_names(cfg: dict[str, Any]) -> list[str]:
    from castseg.data.coco_io import load_coco

    return load_coco(DataConfig.from_dict(cfg["data"], "config", "data").labeled,
                     cfg["data"].get("images_root")).class_names


def run_all(cfg: dict[str, Any], run_dir: Path, resume: bool | str = True, report: bool = True) -> dict[str, Any]:
    """All of CAST plus the supervised-only student with stage 3's budget from θ_s⁰, the
    premise ratio and (with ``data.unlabeled_gt``) the pseudo-labels' AP (:mod:`castseg.run_checks`)."""
    run_checks.load_unlabeled_gt(cfg)  # a wrong path or image set fails now, not after stage 1
    metrics: dict[str, Any] = {}
    teacher = run_adapt(cfg, run_dir, metrics, resume)
    write_json(metrics, run_dir / "metrics.json", indent=1)
    student = run_distill(cfg, run_dir, teacher, metrics, resume)
    write_json(metrics, run_dir / "metrics.json", indent=1)
    run_refine(cfg, run_dir, copy.deepcopy(student), metrics, resume)
    # The baseline's budget: `supervised.train` when given (e.g. distill + refine steps, so the
    # comparison is about data, not iterations), else stage 3's as in the paper.
    run_refine(cfg, run_dir, initial_student(cfg), metrics, resume, key="student_supervised", name="supervised",
               section="supervised")
    metrics["premise_ratio"] = run_checks.premise_ratio(metrics)
    write_json(metrics, run_dir / "metrics.json", indent=1)
    if report:
        from castseg.report import write_report

        efficiency, overlays = report_extras(cfg, metrics)
        metrics["efficiency"] = efficiency
        write_json(metrics, run_dir / "metrics.json", indent=1)
        write_report(run_dir, metrics, efficiency, stages=("adapt/a", "adapt/c", "distill", "refine", "supervised"),
                     overlays=overlays, title=f"castseg run: {run_dir.name}")
    return metrics


def report_extras(cfg: dict[str, Any], metrics: dict[str, Any], num_images: int = 2, repeats: int = 3
                  ) -> tuple[dict[str, dict[str, Any]], list[tuple[str, bytes]]]:
    """Params / GFLOPs / latency of the adapted teacher and the refined student on the first val
    image, and their predictions on the first ``num_images`` val images side by side."""
    from torch.utils.flop_counter import FlopCounterMode

    from castseg.bench import bench_predictor_forward
    from castseg.data.coco_io import load_coco
    from castseg.data.images import read_image
    from castseg.models.inference import resize_masks
    from castseg.predictor import load_predictor, resize_for_model
    from castseg.report import overlay

    data = DataConfig.from_dict(cfg["data"], "config", "data")
    ev = EvalConfig.from_dict(cfg["eval"], "config", "eval")
    if not data.val:
        return {}, []
    val = load_coco(data.val, data.images_root)
    images = [read_image(val.image_path(img)) for img in val.images[:num_images]]
    efficiency: dict[str, dict[str, Any]] = {}
    panels: list[tuple[str, bytes]] = []
    for key, label in (("teacher_adapted", "teacher (adapted)"), ("student_refined", "student (refined)")):
        ckpt = (metrics.get(key) or {}).get("checkpoint")
        if not ckpt:
            continue
        pred = load_predictor(ckpt, topk=ev.topk, score_threshold=0.3)
        x = resize_for_model(images[0], ev.max_size or data.val_max_size)[None]
        net = getattr(pred, "model", None) or getattr(pred, "teacher")
        gflops = None
        if hasattr(pred, "raw"):
            # FlopCounterMode's module tracking needs autograd on; the graph is discarded.
            with FlopCounterMode(display=False) as flops:
                pred.model(x)
            gflops = flops.get_total_flops() / 1e9
        timing = bench_predictor_forward(getattr(pred, "raw", pred), x, repeats)
        efficiency[label] = {"params": sum(p.numel() for p in net.parameters()), "gflops": gflops,
                             "latency_ms": timing["median_ms"]}
        for i, img in enumerate(images):
            r = pred(resize_for_model(img, ev.max_size or data.val_max_size)[None])[0]
            masks = resize_masks(r["masks"], img.shape[:2])
            panels.append((f"val image {i + 1}: {label}", overlay(img, masks.numpy(), label)))
    # teacher and student of the same image next to each other
    n = len(images)
    overlays = [panels[j * n + i] for i in range(n) for j in range(len(panels) // max(n, 1))]
    return efficiency, overlays
