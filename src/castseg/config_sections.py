"""Typed config sections: the dataclasses behind ``train`` / ``data`` / ``eval`` and the field-by-field
check that maps a YAML mapping onto them.

A value of the wrong type or an unknown key is an :class:`~castseg.errors.InputError` naming the
dotted key and the file; ints become floats where floats are expected and lists become tuples
where tuples are. Loading, ``extends`` and overrides live in :mod:`castseg.config`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from castseg.errors import InputError
from castseg.models.student import json_ready


# --- sections ------------------------------------------------------------------------------


class Section:
    """Mixin for config dataclasses: ``from_dict`` (checked) / ``to_dict`` (JSON/YAML-able)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str | Path | None = None, where: str = ""):
        source, where = str(source or "config"), where or cls.__name__
        obj = cls(**check_fields(cls, d or {}, source, where))
        obj.check(source, where)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))

    def check(self, source: str, where: str) -> None:
        """Value checks beyond types (ranges, combinations); raise :class:`InputError`."""


@dataclass
class TrainConfig(Section):
    """One training run of :class:`castseg.engine.Trainer` (one stage). Steps are optimizer steps."""

    max_steps: int = 1000
    batch_size: int = 4                      # per process (GPU); the global batch is × world size × accumulate
    lr: float = 1e-4                         # head lr; the encoder gets lr × backbone_lr_mult
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0                    # linear warm-up from lr/warmup_steps to lr
    grad_clip: float = 1.0                   # max total gradient L2 norm; 0 disables clipping
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 only on CUDA (with a GradScaler)
    accumulate: int = 1                      # micro-batches per optimizer step
    val_every: int = 0                       # steps between validations; 0 = only at the end
    ckpt_every: int = 500                    # steps between resumable checkpoints; 0 = only at the end
    log_every: int = 20
    num_workers: int = 0                     # DataLoader worker processes per stream
    seed: int = 0
    device: str = "auto"                     # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    # Multi-process gradient averaging: "ddp" (DistributedDataParallel, overlaps communication
    # with backward; parameters used in an earlier forward pass of a step but not in the last one
    # break it) or "allreduce" (after backward; any forward structure).
    grad_sync: Literal["ddp", "allreduce"] = "ddp"
    find_unused_parameters: bool = True      # DDP; False is faster when every parameter gets a gradient
    # NHWC weights: CPU convolutions run ~1.2x faster per distillation step (benchmarks/bench_train_step.py);
    # same maths, so not a trajectory field
    channels_last: bool = False
    best_metric: str = "AP"                  # val metric that defines "best" in val_metrics.json
    best_mode: Literal["max", "min"] = "max"
    save_best: bool = False                  # also keep the best model in checkpoints/best/

    # The fields that change the training trajectory: resuming with different values is refused.
    TRAJECTORY = ("max_steps", "batch_size", "lr", "backbone_lr_mult", "weight_decay", "betas", "schedule",
                  "poly_power", "warmup_steps", "grad_clip", "amp", "accumulate", "seed")

    def check(self, source: str, where: str) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "accumulate": self.accumulate,
                    "log_every": self.log_every, "lr": self.lr, "poly_power": self.poly_power}
        non_negative = {"warmup_steps": self.warmup_steps, "grad_clip": self.grad_clip, "val_every": self.val_every,
                        "ckpt_every": self.ckpt_every, "num_workers": self.num_workers,
                        "backbone_lr_mult": self.backbone_lr_mult, "weight_decay": self.weight_decay}
        for k, v in positive.items():
            if not v > 0:
                raise InputError(source, f"{where}.{k} must be > 0, got {v}")
        for k, v in non_negative.items():
            if not v >= 0:
                raise InputError(source, f"{where}.{k} must be >= 0, got {v}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise InputError(source, f"{where}.device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")


@dataclass
class DataConfig(Section):
    """Where the images are and how training views are made."""

    labeled: str | None = None               # COCO instances json
    unlabeled: str | None = None             # COCO json (annotations ignored) or image folder
    val: str | None = None                   # COCO instances json
    # The unlabeled images' own annotations (castseg split's unlabeled_gt.json), when known:
    # only for scoring the pseudo-labels (metrics.json, report); no stage trains on them.
    unlabeled_gt: str | None = None
    images_root: str | None = None
    crop_size: tuple[int, int] | None = None  # training crop (h, w); None keeps the resized image
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    vflip: float = 0.0
    invert: float = 0.0                      # chance of 1 - image (WeakView)
    tint: float = 0.0                        # per-channel gain in [1 - tint, 1 + tint] (WeakView)
    stain: float = 0.0                       # chance of an H&E-like colour map (WeakView)
    strong_view: bool = True
    unlabeled_batch_size: int | None = None  # None: train.batch_size
    size_divisibility: int = 32
    val_max_size: int | None = None          # longer side cap for validation images

    def check(self, source: str, where: str) -> None:
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise InputError(source, f"{where}.scale_range must satisfy 0 < lo <= hi, got {list(self.scale_range)}")
        if not (0 <= self.invert <= 1 and 0 <= self.tint < 1):
            raise InputError(source, f"{where}.invert must be in [0, 1] and {where}.tint in [0, 1), "
                                     f"got {self.invert}, {self.tint}")
        if not 0 <= self.stain <= 1:
            raise InputError(source, f"{where}.stain must be in [0, 1], got {self.stain}")


@dataclass
class EvalConfig(Section):
    """Inference + COCO evaluation (:mod:`castseg.evaluate`)."""

    # 1: a ViT attends over a batch's zero padding, so images of different sizes batched together
    # get different predictions (measured on DSB2018 grey val: AP 0.039 at 1 vs 0.028 at 2)
    batch_size: int = 1
    topk: int = 100                          # instances kept per image
    max_dets: int = 100                      # COCO maxDets (dense scenes need more)
    max_size: int | None = None              # longer side cap at inference
    mask_threshold: float = 0.5
    score_threshold: float = 0.0
    iou_type: Literal["segm", "bbox"] = "segm"


# --- type checking ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin)) + "[...]"
    return getattr(tp, "__name__", str(tp))


_SCALARS: dict[type, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),      # YAML true is not 1
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """``value`` checked against the annotation ``tp``; ints become floats where floats are
    expected and lists become tuples where tuples are. Raises InputError naming ``where``."""
    def bad() -> InputError:
        return InputError(source, f"{where}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise InputError(source, f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            raise bad()
        errors = []
        for a in options:
            try:
                return coerce(value, a, where, source)
            except InputError as e:
                errors.append(e)
        raise errors[0] if len(options) == 1 else bad()  # one option: its own, more precise, message
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if tp in _SCALARS:
        if not _SCALARS[tp](value):
            raise bad()
        return float(value) if tp is float else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return tp(**check_fields(tp, value, source, where))
    if tp in (dict,) or origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise InputError(source, f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            items = [coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [coerce(v, elem, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (tp is tuple or origin is tuple) else items
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise bad()
        return value
    return value  # an annotation we do not model: accept, the consumer checks it


def check_fields(cls: type, d: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """``d`` checked against dataclass ``cls``: unknown keys and wrong types raise InputError."""
    if not isinstance(d, dict):
        raise InputError(source, f"{where}: expected a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise InputError(source, f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                         f"valid keys of {where}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    return {k: coerce(v, hints.get(k, Any), f"{where}.{k}", source) for k, v in d.items()}
