"""Which teacher stage 2 distils from: a safeguard beyond the paper.

The paper distils from θ_T'' (stage 1c). Adaptation can make a teacher worse (on the demo's H&E
images stage 1 moved the stand-in teacher from 12.53 to 12.39 AP; on other images of the same
kind it lost half its AP) and nothing in the paper's recipe notices. With
``adapt.teacher_selection: best`` (the default) the run compares the val AP of θ_T⁰ (zero-shot),
θ_T' (1a) and θ_T'' (1c) and distils from the best; ties go to the later stage, so where
adaptation does not hurt the paper's θ_T'' is kept. ``paper`` always keeps θ_T''.

Without ``data.val`` a part of the labeled images (``adapt.selection_holdout``) is held out of
stage 1 to compare on; the run says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castseg.layout import RunLayout

if TYPE_CHECKING:
    from castseg.config import RunConfig

logger = logging.getLogger(__name__)

# candidate key → (metrics row, what it is); later entries win ties (the paper's order)
CANDIDATES = (("zero_shot", "teacher_zero_shot", "the zero-shot teacher θ_T⁰"),
              ("adapt_a", "teacher_adapted_a", "θ_T' (stage 1a, labels only)"),
              ("adapt_c", "teacher_adapted", "θ_T'' (stage 1c, the paper's)"))


def select_teacher(metrics: dict[str, Any], paths: dict[str, str], mode: str, val: str) -> dict[str, Any]:
    """The ``teacher_selection`` row: ``{"mode", "chosen", "checkpoint", "val_ap": {key: AP},
    "val", "reason"}``. ``paths``: candidate key → what ``load_model`` reads for it."""
    aps = {key: (metrics.get(row) or {}).get("AP") for key, row, _ in CANDIDATES}
    names = {key: text for key, _, text in CANDIDATES}
    chosen, reason = "adapt_c", "teacher_selection: paper keeps θ_T''"
    if mode == "best":
        known = {k: v for k, v in aps.items() if v is not None and v >= 0}
        if "adapt_c" not in known:
            reason = "no val AP for θ_T'' to compare; kept the paper's θ_T''"
        else:
            best = max(known.values())
            chosen = [k for k, _, _ in CANDIDATES if known.get(k) == best][-1]  # ties: the later stage
            others = ", ".join(f"{names[k].split(' (')[0]} {100 * v:.2f}" for k, v in known.items() if k != chosen)
            reason = (f"{names[chosen]} has the best val AP ({100 * best:.2f}; {others})" if chosen != "adapt_c"
                      else f"adaptation did not lower the val AP ({100 * best:.2f}; {others}): the paper's θ_T''")
    return {"mode": mode, "chosen": chosen, "checkpoint": paths[chosen], "val_ap": aps, "val": val, "reason": reason}


def log_selection(row: dict[str, Any]) -> None:
    logger.info(f"teacher for distillation: {row['chosen']} ({row['checkpoint']}): {row['reason']} "
                f"[val: {row['val']}]")


def _absolute(spec: Any) -> Any:
    """A teacher spec with its local paths absolute (it is written into another folder)."""
    if isinstance(spec, list):
        return [_absolute(v) for v in spec]
    if not isinstance(spec, dict):
        return spec
    local = ("path", "detector", "segmenter", "tokenizer")
    return {k: (str(Path(v).resolve()) if k in local and isinstance(v, str) and Path(v).exists() else _absolute(v))
            for k, v in spec.items()}


def write_zero_shot_teacher(cfg: RunConfig, layout: RunLayout) -> str:
    """θ_T⁰ as a teacher config file (``adapt/zero_shot/teacher.yaml``) that ``load_model``
    reads, so that any teacher (a hub composite too) can be distilled from as built."""
    from castseg.models.teacher import write_teacher_yaml

    spec = _absolute(cfg.teacher.model_dump(mode="json", exclude_none=True))
    write_teacher_yaml(layout.zero_shot_teacher.parent, spec)
    return str(layout.zero_shot_teacher)


def holdout_config(cfg: RunConfig, layout: RunLayout) -> tuple[RunConfig, str]:
    """Stage 1's config when there is no ``data.val``: ``adapt.selection_holdout`` of the
    labeled images (at least one, never all) become its val set, the rest its labeled set
    (files in ``adapt/selection/``); also the line that says so. Too few labeled images: the
    config unchanged (the selection then keeps θ_T'')."""
    from castseg.config import with_values
    from castseg.data.coco_io import load_coco, write_json
    from castseg.data.split import coco_subset, make_split

    coco = load_coco(cfg.data.labeled, cfg.data.images_root)
    if len(coco.images) < 2:
        return cfg, "no data.val and one labeled image: nothing to hold out"
    fraction = min(max(cfg.adapt.selection_holdout, 1 / len(coco.images)), (len(coco.images) - 1) / len(coco.images))
    split = make_split(coco, seed=cfg.train.seed, labeled_fraction=1.0, val_fraction=fraction)
    folder = layout.selection_dir
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("labeled", split.labeled), ("val", split.val)):
        write_json(coco_subset(coco, ids, folder), folder / f"{name}.json")
    note = (f"{len(split.val)} of the {len(coco.images)} labeled images held out of stage 1 (no data.val) to "
            f"choose the teacher on ({folder / 'val.json'})")
    return with_values(cfg, {"data.labeled": str(folder / "labeled.json"), "data.val": str(folder / "val.json")},
                       "adapt.teacher_selection"), note
