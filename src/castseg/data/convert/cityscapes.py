"""``cityscapes``: instance annotations from ``*_gtFine_instanceIds.png``.

::

    SRC/gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png   16/32-bit, one value per pixel
    SRC/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png

Pixel value ``v >= 1000`` is instance ``v % 1000`` of label id ``v // 1000``; ``v < 1000`` is a
plain label id. The 8 evaluated thing classes (``hasInstances and not ignoreInEval`` in
cityscapesscripts: person, rider, car, truck, bus, train, motorcycle, bicycle) become COCO
categories with id = Cityscapes label id (24..33), so predictions map straight back to the
official evaluation. A thing-class pixel without an instance number (``v < 1000``) is a group
the annotators could not separate: one ``iscrowd=1`` annotation per class and image. Values of
other classes (including caravan/trailer, which have instances but are not evaluated) are
ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from castseg.data.convert._common import (
    check_same_size,
    coco_output,
    gather,
    image_record,
    masks_to_annotations,
    parse_split,
    read_raw_label,
    require_dir,
    sorted_by_rel,
)
from castseg.errors import InputError

LABEL_SUFFIX = "_gtFine_instanceIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"
SPLITS = {"train": "train", "val": "val", "test": "test"}


def thing_categories() -> list[dict[str, Any]]:
    """The 8 evaluated Cityscapes instance classes as COCO categories (id = label id)."""
    from cityscapesscripts.helpers.labels import labels

    return [{"id": int(lb.id), "name": lb.name, "supercategory": lb.category}
            for lb in sorted(labels, key=lambda lb: lb.id) if lb.hasInstances and not lb.ignoreInEval]


def _instances(label_path: Path, image: dict[str, Any], thing_ids: set[int]) -> list[dict[str, Any]]:
    """Annotations (ids from 0) of one instanceIds PNG, in increasing pixel-value order."""
    raw = read_raw_label(label_path)
    if raw.ndim != 2 or raw.dtype.kind not in "iu":
        raise InputError(label_path, f"expected a single-channel integer instanceIds PNG, got shape "
                                     f"{list(raw.shape)} {raw.dtype}")
    check_same_size(label_path, raw.shape, image)
    raw = raw.astype(np.int32, copy=False)
    values, cats, crowd = [], [], []
    for v in np.unique(raw).tolist():
        cat, is_crowd = (v // 1000, 0) if v >= 1000 else (v, 1)
        if cat in thing_ids:
            values.append(v)
            cats.append(cat)
            crowd.append(is_crowd)
    if not values:
        return []
    # Transposed once so each mask comes out in the encoder's column-major layout.
    label_t = cv2.transpose(np.ascontiguousarray(raw))
    return masks_to_annotations(len(values), image["height"], image["width"],
                                lambda k, out: np.equal(label_t, values[k], out=out), image["id"], cats,
                                iscrowd=crowd)


def convert(src: Path, split: str | None = None, verify_images: bool = True,
            workers: int | None = None) -> dict[str, Any]:
    """Convert one split (default ``train``) of a Cityscapes root ``src``."""
    src = require_dir(Path(src), "Cityscapes root folder")
    split = parse_split(split, SPLITS, "cityscapes", "train")
    gt_dir = require_dir(src / "gtFine" / split, f"gtFine/{split} folder")
    img_dir = require_dir(src / "leftImg8bit" / split, f"leftImg8bit/{split} folder")
    labels = sorted_by_rel(gt_dir.rglob(f"*{LABEL_SUFFIX}"), src)
    if not labels:
        raise InputError(gt_dir, f"no *{LABEL_SUFFIX} files found")
    pairs = []
    for lp in labels:
        stem = lp.name[: -len(LABEL_SUFFIX)]
        ip = img_dir / lp.parent.relative_to(gt_dir) / f"{stem}{IMAGE_SUFFIX}"
        if not ip.is_file():
            raise InputError(lp, f"no matching image {ip.relative_to(src).as_posix()}")
        pairs.append((ip, lp))

    categories = thing_categories()
    thing_ids = {c["id"] for c in categories}

    def load(job: tuple[int, tuple[Path, Path]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        image_id, (ip, lp) = job
        image = image_record(ip, src, image_id, verify_images)
        return image, _instances(lp, image, thing_ids)

    images, annotations = gather(load, pairs, f"cityscapes {split}", workers)
    return coco_output("cityscapes", src, images, annotations, categories,
                       info={"description": f"Cityscapes gtFine {split}, 8 thing classes (category id = "
                                            f"Cityscapes label id), converted by castseg convert"})
