"""Errors the user can act on.

Anything raised as :class:`CastsegError` is printed by the CLI as one line (no traceback) and
exits with code 2. The message must name the file (and record id, where there is one) and say
what is wrong, so the user can fix the input without reading our code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic itself is not imported here: this module stays cheap for every importer
    from pydantic import ValidationError


class CastsegError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2


class InputError(CastsegError):
    """Malformed or inconsistent input data (images, annotation files, configs)."""

    def __init__(self, source: str | Path | None, problem: str):
        self.source = str(source) if source is not None else None
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


# --- pydantic validation errors as one line ------------------------------------------------------
# Here (below models/ and config) so that both castseg.config_sections and the model configs
# (castseg.models.student) can word their errors alike without models importing config.


_EXPECTED = {"float": "float", "int": "int", "bool": "bool", "string": "str", "list": "list", "tuple": "list",
             "dict": "mapping", "model": "mapping", "dataclass": "mapping"}


def _members(tp: Any) -> list[Any]:
    """The model classes an annotation may hold (unions, Optional, Annotated and lists unwrapped)."""
    import typing

    if getattr(tp, "model_fields", None) is not None:
        return [tp]
    return [m for a in typing.get_args(tp) for m in _members(a)]


def _walk(schema: Any, loc: tuple) -> tuple[list[str], Any]:
    """Follow a raw error location through ``schema``: the dotted key's parts (without the tags
    a discriminated union puts into the location: teacher.checkpoint.path -> teacher.path) and
    the model class reached (None when not exactly one)."""
    options, parts = _members(schema), []
    for part in loc:
        tagged = [m for m in options if "type" in m.model_fields and m.model_fields["type"].default == part]
        if len(options) > 1 and tagged:  # the union's tag: pick that member
            options = tagged
            continue
        parts.append(str(part))
        if not isinstance(part, int):
            options = [t for m in options if part in m.model_fields for t in _members(m.model_fields[part].annotation)]
    return parts, (options[0] if len(options) == 1 else None)


def error_key(error: ValidationError, where: str = "", schema: Any = None) -> str:
    """The dotted key of ``error``'s first problem (``where`` prefixed) in ``schema``."""
    parts = _walk(schema, tuple(error.errors()[0]["loc"]))[0]
    return ".".join([where, *parts] if where else parts)


def describe_error(error: ValidationError, where: str, schema: Any = None) -> str:
    """The first error of ``error`` as one line: ``"<where>.<dotted key>: <problem>"``."""
    e = error.errors()[0]
    key = error_key(error, where, schema)
    kind, value = e["type"], e.get("input")
    if kind == "extra_forbidden":
        model = _walk(schema, tuple(e["loc"][:-1]))[1]
        valid = sorted(model.model_fields) if model is not None else None
        parent = key.rsplit(".", 1)[0]
        return f"unknown key {key}" + (f"; valid keys of {parent}: {', '.join(valid)}" if valid else "")
    if kind == "literal_error":
        return f"{key}: must be one of {e['ctx']['expected']}, got {value!r}"
    if kind == "union_tag_invalid":
        return f"{key}.type: must be one of {e['ctx']['expected_tags']}, got {e['ctx']['tag']!r}"
    if kind == "union_tag_not_found":
        return f"{key}: a mapping with 'type' is needed"
    if kind == "missing":
        return f"{key}: required"
    if kind == "value_error":
        msg = str(e["msg"]).removeprefix("Value error, ")
        if re.match(r"[a-z_]+\.[a-z_]", msg):   # a nested section's own message: "train.lr must be > 0"
            return f"{key}.{msg}"
        return f"{key}: {msg}" if msg.startswith(("expected", "unknown")) else f"{key} {msg}"
    for prefix, name in _EXPECTED.items():
        if kind.startswith(prefix):
            return f"{key}: expected {name}, got {value!r}"
    return f"{key}: {e['msg']}, got {value!r}"
