"""``castseg run | adapt | distill | refine CONFIG [key=value ...]``: CAST's stages.

Each verb reads one YAML config (dotted ``key=value`` overrides after it), saves the resolved
config as ``runs/NAME/config.yaml`` and resumes whatever was interrupted (``--no-resume`` starts
the stage over). Finished stages are skipped on re-run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
        p.add_argument("--no-resume", action="store_true", help="retrain stages instead of resuming/skipping")
        if verb == "distill":
            p.add_argument("--teacher", default=None, help="adapted teacher checkpoint (default: this run's adapt/c)")
        if verb == "refine":
            p.add_argument("--init", default=None, help="student checkpoint to refine (default: this run's distill)")
        p.set_defaults(func=run, verb=verb)


def run(args: argparse.Namespace) -> int:
    import json

    from castseg.config import load_config, save_resolved
    from castseg.data.coco_io import write_json
    from castseg.errors import CastsegError
    from castseg.models import load_checkpoint
    from castseg import stages

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.runs) / (args.name or Path(args.config).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir / "config.yaml")
    resume = not args.no_resume
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    if args.verb == "run":
        metrics = stages.run_all(cfg, run_dir, resume)
    elif args.verb == "adapt":
        stages.run_adapt(cfg, run_dir, metrics, resume)
    elif args.verb == "distill":
        adapted = run_dir / "adapt" / "c"
        # a composite (grounded-SAM) teacher is saved in its own format beside the checkpoints
        default = adapted / "teacher" if (adapted / "teacher").is_dir() else adapted / "checkpoints" / "last"
        teacher = Path(args.teacher) if args.teacher else default
        if not teacher.exists():
            raise CastsegError(f"{teacher}: no adapted teacher; run `castseg adapt` first or pass --teacher")
        stages.run_distill(cfg, run_dir, teacher, metrics, resume)
    else:
        init = Path(args.init) if args.init else run_dir / "distill" / "checkpoints" / "last"
        if not init.exists():
            raise CastsegError(f"{init}: no distilled student; run `castseg distill` first or pass --init")
        model, _ = load_checkpoint(init)
        stages.run_refine(cfg, run_dir, model.train(), metrics, resume)
    write_json(metrics, metrics_path, indent=1)
    print(f"{args.verb} done: {run_dir}")
    for key, row in metrics.items():
        if isinstance(row, dict) and row.get("AP") is not None:
            print(f"  {key:<20} AP {row['AP']:.3f}  AP50 {row['AP50']:.3f}  {row.get('checkpoint') or ''}")
    if (run_dir / "report.html").is_file():
        print(f"report: {run_dir / 'report.html'}")
    return 0
