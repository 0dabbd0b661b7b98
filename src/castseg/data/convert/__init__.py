"""Dataset formats → COCO instances dicts.

Registry: format name → ``convert(src: Path, **opts) -> dict`` (a COCO instances dict with an
absolute ``"images_root"``; see :mod:`castseg.data.convert._common` for the id and ordering
conventions). Modules are imported on first use so one format's dependencies (e.g.
cityscapesscripts) never slow down another.

Options each converter accepts (besides ``verify_images`` and ``workers``, which all take):

==============  ============================================
coco            ``images_root``
yolo-seg        ``names`` (yaml path), ``split``
mask-folders    ``class_name``
cityscapes      ``split`` (train | val | test)
ade20k          ``split`` (training | validation)
==============  ============================================
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from castseg.errors import InputError

# name → module in this package defining ``convert``
FORMATS: dict[str, str] = {
    "coco": "coco",
    "yolo-seg": "yolo_seg",
    "mask-folders": "mask_folders",
    "cityscapes": "cityscapes",
    "ade20k": "ade20k",
}

# Format-specific options (keyword names); anything else given for a format is a user error.
OPTIONS: dict[str, tuple[str, ...]] = {
    "coco": ("images_root",),
    "yolo-seg": ("names", "split"),
    "mask-folders": ("class_name",),
    "cityscapes": ("split",),
    "ade20k": ("split",),
}
COMMON_OPTIONS = ("verify_images", "workers")


def get_converter(fmt: str) -> Callable[..., dict[str, Any]]:
    if fmt not in FORMATS:
        raise InputError(None, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return importlib.import_module(f"{__name__}.{FORMATS[fmt]}").convert


def convert(fmt: str, src: str | Path, **opts: Any) -> dict[str, Any]:
    """Convert the dataset at ``src`` in format ``fmt`` to a COCO instances dict."""
    for key in opts:
        if key not in OPTIONS.get(fmt, ()) and key not in COMMON_OPTIONS:
            raise InputError(None, f"option {key!r} does not apply to format {fmt!r}")
    return get_converter(fmt)(Path(src), **opts)
