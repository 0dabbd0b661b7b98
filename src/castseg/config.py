"""Run configuration: YAML files (plus ``key=value`` overrides) mapped onto typed dataclasses.

A config is data, never code: :func:`load_config` reads a YAML mapping whose top-level keys are
*sections*. A section registered with a dataclass (``model`` → :class:`StudentConfig`,
``train`` → :class:`TrainConfig`, ``data`` → :class:`DataConfig`, ``eval`` → :class:`EvalConfig`)
is checked field by field — an unknown key or a value of the wrong type is an
:class:`~castseg.errors.InputError` naming the key and the file — and comes back with every
default filled in, so the saved ``config.yaml`` of a run reproduces it without this version's
defaults. Sections registered as free-form (``None``) are kept as given; code that owns one can
give it a schema with :func:`register_section`.

Overrides are dotted paths with YAML-scalar values::

    train.lr=1e-4  model.num_queries=200  data.labeled=x.json  data.crop_size=[256,256]

``1e-4`` is a float here (PyYAML alone reads it as a string, YAML 1.1's rule), ``true`` a bool,
``null`` None. A file may name a base file with ``extends: base.yaml`` (or a list): bases are
merged first, the file's own keys win, mappings merge key by key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from castseg.errors import InputError
from castseg.models.student import StudentConfig, json_ready


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` / ``3E5`` as floats (YAML 1.2), not as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_scalar(text: str) -> Any:
    """One override value as YAML: ``1e-4`` → 1e-4, ``true`` → True, ``[1,2]`` → [1, 2], ``x.json`` → str."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text  # e.g. an unbalanced bracket in a file name: take it literally


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
    images_root: str | None = None
    crop_size: tuple[int, int] | None = None  # training crop (h, w); None keeps the resized image
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    vflip: float = 0.0
    invert: float = 0.0                      # chance of 1 - image (WeakView)
    tint: float = 0.0                        # per-channel gain in [1 - tint, 1 + tint] (WeakView)
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


# Top-level sections: a dataclass (checked, defaults filled) or None (free-form mapping).
SECTIONS: dict[str, type | None] = {
    "model": StudentConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig,
    "teacher": None, "loss": None, "pseudo_labels": None, "adapt": None, "distill": None, "refine": None,
    "supervised": None, "export": None, "report": None,
}


def register_section(name: str, schema: type | None) -> None:
    """Declare (or re-declare) a top-level section; ``schema`` a dataclass or None (free-form)."""
    SECTIONS[name] = schema


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


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
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
                return _coerce(value, a, where, source)
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
            items = [_coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{where}[{i}]", source) for i, v in enumerate(value)]
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
    return {k: _coerce(v, hints.get(k, Any), f"{where}.{k}", source) for k, v in d.items()}


def build_section(name: str, value: Any, source: str) -> Any:
    """Check one top-level section and return it resolved (every default filled in)."""
    schema = SECTIONS.get(name)
    if schema is None:
        return value
    if value is None:
        value = {}
    if schema is StudentConfig:
        # Preset first, then the given keys (StudentConfig's own rule); the result lists every field.
        check_fields(schema, value, source, name)
        return StudentConfig.from_dict(value, source=source).to_dict()
    if issubclass(schema, Section):
        return schema.from_dict(value, source, name).to_dict()
    return json_ready(dataclasses.asdict(schema(**check_fields(schema, value, source, name))))


# --- loading --------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "config file not found") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise InputError(path, f"cannot read the config ({type(e).__name__})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise InputError(path, f"not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, f"a config must be a mapping of sections, got a {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    """The file merged over its ``extends`` bases; also where each top-level key came from."""
    path = path.resolve()
    if path in seen:
        raise InputError(path, "extends itself (cycle: " + " -> ".join(str(p) for p in (*seen, path)) + ")")
    data = _read_yaml(path)
    bases = data.pop("extends", None)
    if isinstance(bases, str):
        bases = [bases]
    if bases is not None and not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise InputError(path, "extends: expected a file name or a list of file names")
    merged: dict[str, Any] = {}
    origins: list[tuple[str, Path]] = []
    for b in bases or []:
        base_data, base_origins = _load_with_bases(path.parent / b, (*seen, path))
        merged = deep_merge(merged, base_data)
        origins += base_origins
    return deep_merge(merged, data), origins + [(k, path) for k in data]


def apply_override(cfg: dict[str, Any], item: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override in place (unknown sections/fields raise InputError)."""
    source = f"override {item!r}"
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise InputError(source, "expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise InputError(source, f"unknown section {parts[0]!r}; valid: {', '.join(sorted(SECTIONS))}")
    # Check the path through dataclass schemas now, so the error names the override, not the file.
    value = parse_scalar(text)
    schema: Any = SECTIONS[parts[0]]
    for i, p in enumerate(parts[1:], start=1):
        if schema is None or not dataclasses.is_dataclass(schema):
            break
        fields = {f.name for f in dataclasses.fields(schema)}
        if p not in fields:
            raise InputError(source, f"unknown key {'.'.join(parts[:i + 1])}; valid keys of "
                             f"{'.'.join(parts[:i])}: {', '.join(sorted(fields))}")
        hint = typing.get_type_hints(schema).get(p, Any)
        if i == len(parts) - 1 and not dataclasses.is_dataclass(hint):
            value = _coerce(value, hint, key, source)  # a typed leaf: check the value here too
        schema = hint if dataclasses.is_dataclass(hint) else None
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = json_ready(value)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read ``path`` (YAML; None = defaults only), apply ``overrides`` and resolve every section.

    Returns a plain dict ``{section: {...}}`` (JSON/YAML-able) with each dataclass section
    complete; build objects from it with e.g. ``TrainConfig.from_dict(cfg["train"])``. Every
    registered dataclass section is present even when the file omits it.
    """
    if path is not None:
        data, origins = _load_with_bases(Path(path))
    else:
        data, origins = {}, []
    where = {k: str(p) for k, p in origins}
    for k in data:
        if k not in SECTIONS:
            raise InputError(where.get(k, path), f"unknown top-level key {k!r}; valid: {', '.join(sorted(SECTIONS))}")
    for item in overrides:
        apply_override(data, item)
    out: dict[str, Any] = {}
    for name, schema in SECTIONS.items():
        if name in data or schema is not None:
            src = where.get(name, str(path) if path is not None else "config")
            if overrides and any(o.split("=", 1)[0].split(".")[0] == name for o in overrides):
                src += " (with overrides)"
            out[name] = build_section(name, data.get(name), src)
    return out


def save_resolved(cfg: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (temp file + rename). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(json_ready(cfg), sort_keys=False, default_flow_style=None, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# resolved castseg config: every default filled in (castseg load_config)\n")
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def train_config(cfg: dict[str, Any], *overrides: dict[str, Any] | None, source: str = "config") -> TrainConfig:
    """``cfg["train"]`` with per-stage partial overrides on top (e.g. ``cfg["distill"]["train"]``),
    checked like the section itself."""
    d = dict(cfg.get("train") or {})
    for o in overrides:
        if o:
            check_fields(TrainConfig, o, source, "train")
            d.update(o)
    return TrainConfig.from_dict(d, source, "train")
