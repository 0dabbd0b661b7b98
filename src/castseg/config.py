"""Run configuration: YAML files (plus ``key=value`` overrides) parsed once into a typed
:class:`RunConfig` (pydantic v2, unknown keys are errors).

:func:`load_config` reads a YAML mapping whose top-level keys are sections (``model`` →
:class:`~castseg.models.student.StudentConfig`, ``train`` → :class:`TrainConfig`, ``data``,
``eval``, ``loss``, ``pseudo_labels``, ``teacher`` (a union keyed on ``type``), ``adapt`` /
``distill`` / ``refine`` / ``supervised``; see :mod:`castseg.config_sections`). An unknown key
or a value of the wrong type is one :class:`~castseg.errors.InputError` line naming the file
(or the override) and the dotted key. The result has every default filled in, so the saved
``config.yaml`` of a run reproduces it without this version's defaults.

Overrides are dotted paths with YAML-scalar values::

    train.lr=1e-4  model.num_queries=200  data.labeled=x.json  data.crop_size=[256,256]

``1e-4`` is a float here (PyYAML alone reads it as a string, YAML 1.1's rule), ``true`` a bool,
``null`` None. A file may name a base file with ``extends: base.yaml`` (or a list): bases are
merged first, the file's own keys win, mappings merge key by key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import Field, ValidationError

from castseg.atomic import atomic_write_text
from castseg.config_sections import (AdaptConfig, DataConfig, EvalConfig, LossConfig, PseudoLabelsConfig, Section,
                                     StageConfig, TeacherSpec, TrainConfig, describe_error, error_key)
from castseg.errors import InputError
from castseg.models.student import StudentConfig

__all__ = ["DataConfig", "EvalConfig", "LossConfig", "PseudoLabelsConfig", "RunConfig", "StageConfig", "TrainConfig",
           "apply_override", "deep_merge", "load_config", "parse_scalar", "save_resolved"]


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


class RunConfig(Section):
    """A whole run: every section typed, every default filled in."""

    model: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    loss: LossConfig = LossConfig()
    pseudo_labels: PseudoLabelsConfig = PseudoLabelsConfig()
    teacher: TeacherSpec | None = None
    adapt: AdaptConfig = AdaptConfig()
    distill: StageConfig = StageConfig()
    refine: StageConfig = StageConfig()
    # the supervised-only baseline; without train overrides it gets stage 3's (the paper's rule)
    supervised: StageConfig = StageConfig()

    def stage_train(self, stage: str) -> TrainConfig:
        """``train`` with the stage's overrides on top (``supervised`` falls back to ``refine``'s)."""
        over = getattr(self, stage).overrides()
        if stage == "supervised" and not over:
            over = self.refine.overrides()
        return TrainConfig.model_validate({**self.train.model_dump(), **over})

    @property
    def val_max_size(self) -> int | None:
        """The longer-side cap of validation images: ``eval.max_size``, else ``data.val_max_size``."""
        return self.eval.max_size or self.data.val_max_size


SECTIONS = tuple(RunConfig.model_fields)


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
    """Apply one ``a.b.c=value`` override in place to a raw config mapping (the value is checked
    when the whole config is validated; :func:`load_config` names the override then)."""
    source = f"override {item!r}"
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise InputError(source, "expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise InputError(source, f"unknown section {parts[0]!r}; valid: {', '.join(sorted(SECTIONS))}")
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = parse_scalar(text)
    return cfg


def _validate(data: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise InputError(source, describe_error(e, "", RunConfig)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (YAML; None = defaults only), apply ``overrides`` and parse the result.

    An error in the file names the file (the base file, for a key from an ``extends`` base);
    one that an override brings in names the override.
    """
    if path is not None:
        data, origins = _load_with_bases(Path(path))
    else:
        data, origins = {}, []
    where = {k: str(p) for k, p in origins}
    for k in data:
        if k not in SECTIONS:
            raise InputError(where.get(k, path), f"unknown top-level key {k!r}; valid: {', '.join(sorted(SECTIONS))}")
    for name in data:  # each section against the file it came from
        _validate({name: data[name]}, where.get(name, str(path)))
    for item in overrides:
        apply_override(data, item)
        _check_override(data, item)
    return _validate(data, str(path) if path is not None else "config")


def _check_override(data: dict[str, Any], item: str) -> None:
    """Raise, naming the override, when the config is invalid under the override's key (an
    error elsewhere, e.g. ``teacher.members`` after ``teacher.type=ensemble``, may be filled
    in by a later override; the final check names the file)."""
    try:
        RunConfig.model_validate(data)
    except ValidationError as e:
        key, bad = item.partition("=")[0].strip(), error_key(e, "", RunConfig)
        if bad == key or bad.startswith(key + ".") or key.startswith(bad + ".") or not bad:
            raise InputError(f"override {item!r}", describe_error(e, "", RunConfig)) from None


def save_resolved(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically. Returns ``path``."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)
    return atomic_write_text(path, "# resolved castseg config: every default filled in (castseg load_config)\n" + text)


def with_values(cfg: RunConfig, values: dict[str, Any], source: str = "config") -> RunConfig:
    """A copy of ``cfg`` with dotted keys set (``{"data.labeled": p, "teacher": {...}}``), checked
    like a loaded config (e.g. a command filling in the paths it made)."""
    data = cfg.to_dict()
    for key, value in values.items():
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return _validate(data, source)
