"""``castseg run | adapt | distill | refine CONFIG [key=value ...]``: CAST's stages.

Each verb reads one YAML config (dotted ``key=value`` overrides after it), saves the resolved
config as ``runs/NAME/config.yaml`` and resumes whatever was interrupted (``--no-resume`` starts
the stage over). Finished stages are skipped on re-run; a stage whose settings changed since
(or whose earlier stage was redone) is refused, or with ``--restart-changed`` set aside as
``<stage>.stale-<n>`` and redone.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
VERBS = {
    "run": "all stages + the supervised-only baseline, metrics.json and the report",
    "adapt": "stage 1: adapt the teacher (a: labels + L_pxl; b: pseudo-label; c: re-init + labels + pseudo-labels)",
    "distill": "stage 2: the student learns from the frozen adapted teacher's pseudo-labels (J)",
    "refine": "stage 3: fine-tune the distilled student on the labels only",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    for verb, help_text in VERBS.items():
        p = subparsers.add_parser(verb, help=help_text, description=f"castseg {verb}: {help_text}. " + __doc__.split("\n\n")[1])
        p.add_argument("config", help="experiment YAML (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
        p.add_argument("--name", default=None, help="run name (default: the config file's stem)")
        p.add_argument("--runs", default="runs", help="parent folder of run directories (default runs/)")
        p.add_argument("--resume", action="store_true", default=True,
                       help="continue interrupted stages and skip finished ones (the default)")
        how = p.add_mutually_exclusive_group()
        how.add_argument("--no-resume", action="store_true", help="retrain stages instead of resuming/skipping")
        how.add_argument("--restart-changed", action="store_true",
                         help="a stage trained earlier with other settings (or after a stage that is redone now) "
                         "is moved aside to <stage>.stale-<n> and started over, instead of refused; stages "
                         "whose settings match are still resumed or reused")
        if verb != "refine":
            p.add_argument("--unlabeled-gt", metavar="PATH", default=None,
                           help="COCO json with the unlabeled images' own annotations (castseg split's "
                           "unlabeled_gt.json; sets data.unlabeled_gt): the pseudo-labels' AP against it goes "
                           "into metrics.json and the report; no stage trains on it")
        if verb == "distill":
            src = p.add_mutually_exclusive_group()
            src.add_argument("--teacher", default=None, help="adapted teacher checkpoint (default: this run's adapt/c)")
            src.add_argument("--pseudo-labels", metavar="P.json", default=None,
                             help="train on this pseudo-label cache instead of running a teacher (from `castseg "
                             "pseudo-label`, e.g. --predictions of a model run elsewhere)")
        if verb == "refine":
            p.add_argument("--init", default=None, help="student checkpoint to refine (default: this run's distill)")
        p.set_defaults(func=run, verb=verb)


def run(args: argparse.Namespace) -> int:
    import json

    from castseg.config import load_config, save_resolved, with_values
    from castseg.data.coco_io import write_json
    from castseg.errors import InputError
    from castseg import run_checks, stages
    from castseg.engine.distributed import is_main_process

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "unlabeled_gt", None):
        if not Path(args.unlabeled_gt).is_file():
            raise InputError(args.unlabeled_gt, "--unlabeled-gt: no such file (expected the unlabeled images' "
                             "own annotations, e.g. castseg split's unlabeled_gt.json)")
        cfg = with_values(cfg, {"data.unlabeled_gt": args.unlabeled_gt}, "--unlabeled-gt")
    run_dir = Path(args.runs) / (args.name or Path(args.config).stem)
    main = is_main_process()  # under torchrun every rank trains; rank 0 alone writes the run's files
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
    resume = False if args.no_resume else ("auto" if args.restart_changed else True)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    run_checks.check_classes(cfg)  # before any training (run_all checks again, for the API and the demo)
    if args.verb in ("adapt", "distill", "run"):
        run_checks.load_unlabeled_gt(cfg)  # before any training (run_all checks it again)
    if args.verb == "run":
        if main and not metrics:  # a fresh run: what it will need, before hours are spent
            log_plan(cfg)
        metrics = stages.run_all(cfg, run_dir, resume)
    else:
        run_stage(args, cfg, run_dir, resume, metrics)
    if not main:
        return 0
    write_json(metrics, metrics_path, indent=1)
    logger.info(f"{args.verb} done: {run_dir}")
    print_summary(metrics, with_premise=args.verb == "run")
    if (run_dir / "report.html").is_file():
        logger.info(f"report: {run_dir / 'report.html'}")
    return 0


def log_plan(cfg) -> None:
    """On a GPU run, log :func:`castseg.plan.plan_run`'s per-stage summary (quick: one image
    replayed, no data timing); an estimate that fails only warns — it never stops a run. The
    replay takes 10-40 s of CPU: on a CPU run, where no GPU memory is at stake, one hint line."""
    import time

    from castseg.device import resolve_device

    if resolve_device(cfg.train.device).type != "cuda":
        logger.info("plan: `castseg plan CONFIG` estimates each stage's memory per GPU and GFLOPs per step "
                    "(printed here when the run is on a GPU)")
        return
    start = time.perf_counter()
    try:
        from castseg.plan import plan_run, summary_lines

        lines = summary_lines(plan_run(cfg, measure_data=False, quick=True))
    except Exception as e:  # noqa: BLE001 - an estimate must never stop the run it describes
        logger.warning(f"plan: no estimate ({type(e).__name__}: {e}); `castseg plan CONFIG` for details")
        return
    logger.info(f"plan (estimated; `castseg plan CONFIG` for details, {time.perf_counter() - start:.1f}s):")
    for line in lines:
        logger.info(f"  {line}")


def run_stage(args: argparse.Namespace, cfg, run_dir: Path, resume, metrics: dict) -> None:
    """``castseg adapt | distill | refine``: one stage, its rows merged into ``metrics``."""
    from castseg.errors import CastsegError
    from castseg.models import load_checkpoint
    from castseg import run_checks, stages

    if args.verb == "adapt":
        run_checks.merge_rows(metrics, stages.run_adapt(cfg, run_dir, resume)[1])
    elif args.verb == "distill" and args.pseudo_labels:
        cache = Path(args.pseudo_labels)
        run_checks.merge_rows(metrics, stages.pseudo_label_rows(cfg, "imported", cache))
        run_checks.merge_rows(metrics, stages.distill_from_cache(cfg, run_dir, cache, resume)[1])
    elif args.verb == "distill":
        adapted = run_dir / "adapt" / "c"
        # a composite (grounded-SAM) teacher is saved in its own format beside the checkpoints
        default = adapted / "teacher" if (adapted / "teacher").is_dir() else adapted / "checkpoints" / "last"
        teacher = Path(args.teacher) if args.teacher else default
        if not teacher.exists():
            raise CastsegError(f"{teacher}: no adapted teacher; run `castseg adapt` first or pass --teacher")
        run_checks.merge_rows(metrics, stages.run_distill(cfg, run_dir, teacher, resume)[1])
    else:
        init = Path(args.init) if args.init else run_dir / "distill" / "checkpoints" / "last"
        if not init.exists():
            raise CastsegError(f"{init}: no distilled student; run `castseg distill` first or pass --init")
        model, _ = load_checkpoint(init)
        metrics.update(stages.run_refine(cfg, run_dir, model.train(), resume))


def print_summary(metrics: dict, with_premise: bool) -> None:
    """Each model's AP, the pseudo-labels' AP and quality where known, and (whole runs) the premise."""
    from castseg import run_checks

    for key, row in metrics.items():
        if isinstance(row, dict) and row.get("AP") is not None:
            print(f"  {key:<20} AP {row['AP']:.3f}  AP50 {row['AP50']:.3f}  {row.get('checkpoint') or ''}")
    pseudo = metrics.get("pseudo_labels") or {}
    for key, label in run_checks.PSEUDO_LABEL_SOURCES.items():
        if key in pseudo:
            row = pseudo[key]
            print(f"  pseudo-labels of {label}: AP {row['AP']:.3f}  AP50 {row['AP50']:.3f} on the "
                  f"{pseudo['num_images']} unlabeled images ({pseudo['ground_truth']})")
            if row.get("quality"):
                print(f"    {run_checks.quality_text(row['quality'])}")
    if with_premise:
        print(f"  {run_checks.premise_text(metrics)}")
