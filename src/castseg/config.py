"""Run configuration: YAML files (plus ``key=value`` overrides) mapped onto typed dataclasses.

A config is data, never code: :func:`load_config` reads a YAML mapping whose top-level keys are
*sections*. A section registered with a dataclass (``model`` → :class:`StudentConfig`,
``train`` → :class:`TrainConfig`, ``data`` → :class:`DataConfig`, ``eval`` → :class:`EvalConfig`)
is checked field by field — an unknown key or a value of the wrong type is an
:class:`~castseg.errors.InputError` naming the key and the file — and comes back with every
default filled in, so the saved ``config.yaml`` of a run reproduces it without this version's
defaults. Sections registered as free-form (``None``) are kept as given; code that owns one can
give it a schema with :func:`register_section`. The section dataclasses and the type check
are in :mod:`castseg.config_sections` (re-exported here).

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
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from castseg.config_sections import DataConfig, EvalConfig, Section, TrainConfig, check_fields, coerce
from castseg.errors import InputError
from castseg.models.student import StudentConfig, json_ready

__all__ = ["DataConfig", "EvalConfig", "SECTIONS", "Section", "TrainConfig", "apply_override", "build_section",
           "check_fields", "deep_merge", "load_config", "parse_scalar", "register_section", "save_resolved",
           "train_config"]


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


# Top-level sections: a dataclass (checked, defaults filled) or None (free-form mapping).
SECTIONS: dict[str, type | None] = {
    "model": StudentConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig,
    "teacher": None, "loss": None, "pseudo_labels": None, "adapt": None, "distill": None, "refine": None,
    "supervised": None, "export": None, "report": None,
}


def register_section(name: str, schema: type | None) -> None:
    """Declare (or re-declare) a top-level section; ``schema`` a dataclass or None (free-form)."""
    SECTIONS[name] = schema


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
            value = coerce(value, hint, key, source)  # a typed leaf: check the value here too
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
