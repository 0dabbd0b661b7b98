"""MkDocs hooks (``hooks:`` in mkdocs.yml): the reference parts of the site are generated from
the code at build time, so they cannot go stale.

- ``<!-- generated: config-reference -->`` (configs.md) becomes one table per section of
  :class:`castseg.config.RunConfig` (pydantic v2): key, type, default and description. The
  description is the field's ``description`` or else its comment in the source (the comment at
  the end of its line, or the comment lines right above it).
- ``<!-- generated: cli-reference -->`` (cli.md) becomes ``castseg <verb> --help`` for every verb
  (and every ``castseg convert`` format), from :func:`castseg.cli.build_parser`.

A page that should hold a marker and does not, or a marker on another page, fails the build.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # the checkout's castseg, also without an installed one
    sys.path.insert(0, str(ROOT / "src"))

MARKERS = {"configs.md": "<!-- generated: config-reference -->", "cli.md": "<!-- generated: cli-reference -->"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    name = page.file.src_uri
    for where, marker in MARKERS.items():
        if marker in markdown and name != where:
            raise PluginError(f"{name}: {marker} belongs on {where}")
    marker = MARKERS.get(name)
    if marker is None:
        return markdown
    if marker not in markdown:
        raise PluginError(f"{name} lost its {marker} line (the generated reference goes there)")
    render = config_reference if name == "configs.md" else cli_reference
    return markdown.replace(marker, render())


# --- the config reference -----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """A field's annotation as a reader writes it in YAML terms: ``int or null``, ``"poly" or "cosine"``."""
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(_type_name(a) for a in args) + "]"
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(tp, type):
        if getattr(tp, "model_fields", None) is not None:
            return "teacher" if tp.__name__.endswith("TeacherSpec") else "mapping"
        return {"str": "str", "int": "int", "float": "float", "bool": "bool", "dict": "mapping"}.get(tp.__name__,
                                                                                                    tp.__name__)
    return str(tp).replace("typing.", "")


def _default(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return "(section)"

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return f"`{json.dumps(plain(value))}`"


def _source_comments(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the comment lines right above it (unless they are a
    one- or two-word group heading) and the comment ending its line."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if re.match(r"^ {4}#", line):
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"^ {4}(\w+)\s*:[^=]*?(?:=.*?)?(?:#\s*(.*))?$", line)
        if m and not line.startswith("     ") and m.group(1) in cls.model_fields:
            trailing = m.group(2) or ""
            if trailing.startswith("type:") or trailing.startswith("noqa"):
                trailing = ""
            block = " ".join(above)
            if len(block.split()) <= 2:  # a group heading such as "# decoder", not this field's description
                block = ""
            out[m.group(1)] = " ".join(x for x in (block, trailing) if x)
        above = []
    return out


def _models_in(tp: Any) -> list[type]:
    """The section models an annotation holds (Optional, unions and Annotated unwrapped)."""
    if getattr(tp, "model_fields", None) is not None:
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models_in(a)]


def _cell(text: str) -> str:
    return text.replace("|", "&#124;").replace("\n", " ")


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    first = doc.split("\n\n")[0].replace("\n", " ")
    return re.sub(r":(?:class|func|mod|meth|attr):`~?([^`]+)`", r"`\1`", first)


def _section_table(cls: type, prefix: str) -> list[str]:
    comments = _source_comments(cls)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        desc = field.description or comments.get(name, "")
        rows.append(f"| `{prefix}{name}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} | "
                    f"{_cell(desc)} |")
    return rows


def config_reference() -> str:
    from castseg.config import RunConfig
    from castseg.config_sections import StageConfig, TrainConfig

    out: list[str] = []
    stages: list[str] = []
    for section, field in RunConfig.model_fields.items():
        tp = field.annotation
        if tp is StageConfig:
            stages.append(section)
            continue
        members = _models_in(tp)
        if len(members) == 1 and members[0] is tp:
            out += [f"### `{section}`", "", _summary(tp), ""] + _section_table(tp, f"{section}.") + [""]
        elif members:  # the teacher: a union keyed on `type`
            out += [f"### `{section}`", "",
                    f"Optional (`null`: no teacher). One of {len(members)} kinds, chosen by `{section}.type`.", ""]
            for m in members:
                kind = m.model_fields["type"].default
                out += [f"#### `{section}.type: {kind}`", "", _summary(m), ""] + _section_table(m, f"{section}.")
                out.append("")
        else:
            raise PluginError(f"RunConfig.{section}: no section model to document ({tp!r})")
    if stages:
        names = ", ".join(f"`{s}`" for s in stages)
        out += [f"### {names}", "", _summary(StageConfig), "",
                f"Each of them takes one key, `train`, whose keys are those of the `train` section above "
                f"({len(TrainConfig.model_fields)} keys), each optional: a key left out keeps the `train` "
                "section's value. `supervised` without `train` keys takes `refine`'s (the paper's rule: the "
                "supervised-only student trains like stage 3).", ""]
    return "\n".join(out)


# --- the CLI reference --------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    from castseg.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: make the page the same everywhere
    try:
        top = build_parser()
        out = ["## `castseg`", "", "```text", top.format_help().rstrip(), "```", ""]
        for verb, parser in _subcommands(top).items():
            out += [f"## `castseg {verb}`", "", "```text", parser.format_help().rstrip(), "```", ""]
            for sub, subparser in _subcommands(parser).items():
                out += [f"### `castseg {verb} {sub}`", "", "```text", subparser.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(out)
