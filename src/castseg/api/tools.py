"""``castseg.plan`` and ``castseg.describe``: what a run will need, what a model costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plan(config: str | Path, *overrides: str, measure_data: bool = True, quick: bool = False) -> dict[str, Any]:
    """Per stage of :func:`castseg.run`: parameters, GFLOPs per training step and the estimated
    peak memory per GPU process, plus the data loader's decode cost per step (models on the meta
    device: no weights, no download; :mod:`castseg.plan` says what is counted).

    Args:
        config: an experiment YAML; ``overrides``: dotted ``key=value`` settings.
        measure_data: time the data loader on the config's images (when they exist).
        quick: replay one image for the activation estimate (seconds instead of a minute).

    Returns:
        ``{"stages": {name: row}, "data": {...}, "assumptions": [...]}`` as ``castseg plan
        --json`` prints it; a row holds ``params``, ``gflops_per_step``, the memory terms (bytes)
        and ``batch`` / ``size``.
    """
    from castseg.config import load_config
    from castseg.plan import plan_run

    return plan_run(load_config(config, list(overrides)), measure_data=measure_data, quick=quick)


def describe(model: str | Path, *, size: tuple[int, int] = (512, 512)) -> dict[str, Any]:
    """Parameters and the GFLOPs of one forward at ``size`` (H, W) of a student preset (``tiny``,
    ``small`` ...), a named teacher (``teacher-gdino-sam2-paper``) or a castseg checkpoint,
    counted on the meta device (no weights, no download)."""
    from castseg.models.sizes import describe_model

    return describe_model(str(model), tuple(size))
