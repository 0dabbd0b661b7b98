"""``castseg.run | adapt | distill | refine``: CAST's stages from Python, the path the CLI takes.

Each reads one YAML config (dotted ``key=value`` overrides after it), writes the resolved config
as ``runs/NAME/config.yaml``, resumes whatever was interrupted and skips finished stages; the
stages themselves are :func:`castseg.stages.run_stages`, the run folder
:class:`castseg.layout.RunLayout`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from castseg.layout import ADAPT_C, REFINE, SUPERVISED, RunLayout

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What a run left behind.

    Attributes:
        run_dir: the run folder (``runs/NAME``).
        metrics: metrics.json's content: a row per model (``AP``, ``AP50``, ``checkpoint``),
            the pseudo-labels' quality, the premise ratio, efficiency.
        stages: stage name (``adapt/a`` ... ``supervised``) → its folder, for those that exist.
        report: ``report.html`` (None before a whole run finished).
        student: the refined student's checkpoint (None before stage 3).
        teacher: the adapted teacher (θ_T''; None before stage 1).
    """

    run_dir: Path
    metrics: dict[str, Any]
    stages: dict[str, Path]
    report: Path | None
    student: Path | None
    teacher: Path | None

    @classmethod
    def of(cls, run_dir: str | Path, metrics: dict[str, Any]) -> "RunResult":
        layout = RunLayout.of(run_dir)
        refined = layout.checkpoint(REFINE)
        teacher = layout.trained_model(ADAPT_C)
        return cls(layout.root, metrics, layout.existing_stages(), layout.report if layout.report.is_file() else None,
                   refined if refined.exists() else None, teacher if teacher.exists() else None)

    @property
    def supervised(self) -> Path | None:
        """The supervised-only student's checkpoint (the baseline CAST must beat)."""
        path = RunLayout.of(self.run_dir).checkpoint(SUPERVISED)
        return path if path.exists() else None


def _stages(verb: str, config: Any, overrides: tuple[str, ...], *, name: str | None, runs: str | Path,
            resume: bool, restart_changed: bool, unlabeled_gt: str | Path | None = None,
            **inputs: Any) -> RunResult:
    from castseg import stages
    from castseg.config import RunConfig, load_config, save_resolved, with_values
    from castseg.engine.distributed import is_main_process
    from castseg.errors import InputError

    if isinstance(config, RunConfig):
        if name is None:
            raise InputError(None, "a RunConfig object needs name= (the run folder's name)")
        cfg = config if not overrides else _override(config, overrides)
    else:
        cfg = load_config(config, list(overrides))
    if unlabeled_gt is not None:
        if not Path(unlabeled_gt).is_file():
            raise InputError(unlabeled_gt, "unlabeled_gt (--unlabeled-gt): no such file (expected the unlabeled "
                             "images' own annotations, e.g. castseg split's unlabeled_gt.json)")
        cfg = with_values(cfg, {"data.unlabeled_gt": str(unlabeled_gt)}, "--unlabeled-gt")
    layout = RunLayout(Path(runs) / (name or Path(config).stem))
    main = is_main_process()  # under torchrun every rank trains; rank 0 alone writes the run's files
    if main:
        layout.root.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, layout.config)
    fresh = verb == "run" and main and not layout.metrics.is_file()
    mode: bool | str = False if not resume else ("auto" if restart_changed else True)
    # a fresh run: what it will need, after the data checks and before hours are spent
    metrics = stages.run_stages(verb, cfg, layout, mode, on_start=(lambda: _log_plan(cfg)) if fresh else None,
                                **inputs)
    if main:
        logger.info(f"{verb} done: {layout.root}")
    return RunResult.of(layout.root, metrics)


def _override(cfg: Any, overrides: tuple[str, ...]) -> Any:
    """``key=value`` overrides on an in-memory config (validated like a file's)."""
    from castseg.config import apply_override, _validate

    data = cfg.to_dict()
    for item in overrides:
        data = apply_override(data, item)
    return _validate(data, "overrides")


def _log_plan(cfg: Any) -> None:
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


def run(config: str | Path, *overrides: str, name: str | None = None, runs: str | Path = "runs",
        resume: bool = True, restart_changed: bool = False, unlabeled_gt: str | Path | None = None,
        report: bool = True) -> RunResult:
    """All of CAST (adapt → distill → refine) plus the supervised-only student, metrics.json and
    the report, in ``runs/NAME`` (NAME: ``name`` or the config file's stem).

    Args:
        config: an experiment YAML (see ``configs/``) or a :class:`~castseg.config.RunConfig`
            (then ``name`` is required).
        overrides: dotted ``key=value`` settings, e.g. ``"train.lr=1e-4"``.
        resume: continue interrupted stages and skip finished ones; False retrains.
        restart_changed: a stage trained earlier with other settings is set aside
            (``<stage>.stale-<n>``) and redone instead of refused.
        unlabeled_gt: the unlabeled images' own annotations (``castseg.split``'s
            ``unlabeled_gt.json``): the pseudo-labels are scored against them; nothing trains on them.
        report: write report.md / report.html.

    Returns:
        A :class:`RunResult`.

    Examples:
        >>> import castseg
        >>> result = castseg.run("tiny.yaml", "train.max_steps=3")   # runs/tiny
        >>> sorted(result.stages)
        ['adapt/a', 'adapt/c', 'distill', 'refine', 'supervised']
        >>> result.student.as_posix(), result.report.name
        ('runs/tiny/refine/checkpoints/last', 'report.html')
        >>> round(result.metrics["student_refined"]["AP"], 3)   # 3 steps from random weights
        0.0
    """
    return _stages("run", config, overrides, name=name, runs=runs, resume=resume, restart_changed=restart_changed,
                   unlabeled_gt=unlabeled_gt, report=report)


def adapt(config: str | Path, *overrides: str, name: str | None = None, runs: str | Path = "runs",
          resume: bool = True, restart_changed: bool = False, unlabeled_gt: str | Path | None = None) -> RunResult:
    """Stage 1 alone: adapt the teacher (a: labels + L_pxl; b: pseudo-label; c: re-initialise,
    labels + pseudo-labels). Arguments as for :func:`run`; the rows go into metrics.json."""
    return _stages("adapt", config, overrides, name=name, runs=runs, resume=resume, restart_changed=restart_changed,
                   unlabeled_gt=unlabeled_gt)


def distill(config: str | Path, *overrides: str, name: str | None = None, runs: str | Path = "runs",
            teacher: str | Path | None = None, pseudo_labels: str | Path | None = None, resume: bool = True,
            restart_changed: bool = False, unlabeled_gt: str | Path | None = None) -> RunResult:
    """Stage 2 alone: the student learns from the frozen adapted teacher's pseudo-labels.

    Args:
        teacher: the adapted teacher (default: this run's ``adapt/c``).
        pseudo_labels: train on this cache (``castseg.pseudo_label``) instead of running a teacher.

    Other arguments as for :func:`run`.
    """
    if teacher is not None and pseudo_labels is not None:
        from castseg.errors import CastsegError

        raise CastsegError("give a teacher or a pseudo-label cache to distill from, not both")
    return _stages("distill", config, overrides, name=name, runs=runs, resume=resume,
                   restart_changed=restart_changed, unlabeled_gt=unlabeled_gt, teacher=teacher,
                   pseudo_labels=pseudo_labels)


def refine(config: str | Path, *overrides: str, name: str | None = None, runs: str | Path = "runs",
           init: str | Path | None = None, resume: bool = True, restart_changed: bool = False) -> RunResult:
    """Stage 3 alone: fine-tune the distilled student (or ``init``) on the labels only.
    Arguments as for :func:`run`."""
    return _stages("refine", config, overrides, name=name, runs=runs, resume=resume, restart_changed=restart_changed,
                   init=init)
