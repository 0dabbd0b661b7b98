"""``coco``: validate and normalise an existing COCO instances json.

Everything :func:`castseg.data.coco_io.load_coco` checks (structure, ids, references, polygon
and RLE validity, empty masks, file names escaping the images root) plus, per image, that the
file exists, decodes and has the width/height the json claims — annotations of the wrong size
would otherwise surface as shape errors deep inside training.

Normalisation: ``area``/``bbox`` recomputed from the masks, RLE (compressed or not) written
compressed, polygons kept as given, ``iscrowd`` an int. Ids, order and ``file_name`` are kept as
given, so prediction files that refer to image ids stay valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from castseg.data.coco_io import load_coco
from castseg.data.convert._common import coco_output, image_record, parallel_map
from castseg.errors import InputError


def convert(src: Path, images_root: Path | None = None, verify_images: bool = True,
            workers: int | None = None) -> dict[str, Any]:
    """Normalise the COCO json ``src``; images resolve against ``images_root`` (default: the
    json's ``"images_root"`` key, else its folder). ``verify_images=False`` skips opening the
    images entirely (sizes come from the json), for annotation-only files."""
    src = Path(src)
    if src.is_dir():
        raise InputError(src, "is a folder; the coco format converts one COCO json file")
    data = load_coco(src, images_root)
    root = data.images_root
    if verify_images and not Path(root).is_dir():
        raise InputError(root, "images root folder not found (set --images-root)")

    def check(image: dict[str, Any]) -> None:
        path = data.image_path(image)
        found = image_record(path, path.parent, image["id"], verify=True)
        if (found["width"], found["height"]) != (image["width"], image["height"]):
            raise InputError(path, f"image is {found['width']}x{found['height']} but {src} (image id="
                                   f"{image['id']}) says {image['width']}x{image['height']}")

    if verify_images:
        for _ in parallel_map(check, data.images, "coco", workers):
            pass

    out = coco_output("coco", root, data.images, data.annotations, data.categories, info=data.info)
    # Keys we do not interpret (licenses, ...) travel along unchanged.
    for k, v in data.extra.items():
        out.setdefault(k, v)
    return out
