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
    from castseg import api
    from castseg.engine.distributed import is_main_process

    common = dict(name=args.name or Path(args.config).stem, runs=args.runs, resume=not args.no_resume,
                  restart_changed=args.restart_changed)
    if args.verb != "refine":
        common["unlabeled_gt"] = args.unlabeled_gt
    if args.verb == "distill":
        common.update(teacher=args.teacher, pseudo_labels=args.pseudo_labels)
    if args.verb == "refine":
        common["init"] = args.init
    result = getattr(api, args.verb)(args.config, *args.overrides, **common)
    if not is_main_process():
        return 0
    print_summary(result.metrics, with_premise=args.verb == "run")
    if result.report is not None:
        logger.info(f"report: {result.report}")
    return 0


def print_summary(metrics: dict, with_premise: bool) -> None:
    """Each model's AP, the pseudo-labels' AP and quality where known, and (whole runs) the premise."""
    from castseg import run_checks
    from castseg.model_rows import MODEL_ROWS

    MODEL_KEYS = {r.key for r in MODEL_ROWS} | {"teacher_adapted_a"}
    for key, row in metrics.items():
        if key in MODEL_KEYS and isinstance(row, dict) and row.get("AP") is not None:
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
    from castseg.report import verdict_lines

    for line in verdict_lines(metrics):
        print(f"  {line}")
