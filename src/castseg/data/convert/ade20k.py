"""``ade20k``: the ADE20K instance-segmentation benchmark (100 thing classes), as prepared for
Mask2Former.

::

    SRC[/ADEChallengeData2016]/images/<split>/*.jpg
    SRC[/ADEChallengeData2016]/annotations_instance/<split>/<stem>.png   R = category (1..100),
                                                                          G = instance (0 = none)
    SRC[/ADEChallengeData2016]/ade20k_instance_imgCatIds.json           optional: "categories"

An instance is the set of pixels with one G value; all of them must carry the same category.
Category ids are the benchmark's instance category ids (1..100, the R values), taken from
``ade20k_instance_imgCatIds.json`` when present, else from the built-in table below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from castseg.data.coco_io import read_json
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
from castseg.data.images import is_image_file
from castseg.errors import InputError

CATEGORIES_FILE = "ade20k_instance_imgCatIds.json"
SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}

# Names of instance category ids 1..100, in id order: the "categories" list of the benchmark's
# ade20k_instance_imgCatIds.json (checked against the copy in Mask2Former's datasets/ folder).
ADE20K_INSTANCE_NAMES = (
    "bed", "windowpane", "cabinet", "person", "door", "table", "curtain", "chair", "car", "painting",
    "sofa", "shelf", "mirror", "armchair", "seat", "fence", "desk", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "box", "column", "signboard", "chest of drawers", "counter", "sink", "fireplace",
    "refrigerator", "stairs", "case", "pool table", "pillow", "screen door", "bookcase", "coffee table",
    "toilet", "flower", "book", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "arcade machine", "bus", "towel", "light", "truck", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "apparel", "pole", "bannister", "ottoman",
    "bottle", "van", "ship", "fountain", "washer", "plaything", "stool", "barrel", "basket", "bag",
    "minibike", "oven", "ball", "food", "step", "trade name", "microwave", "pot", "animal", "bicycle",
    "dishwasher", "screen", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "plate", "monitor", "bulletin board", "radiator", "glass", "clock", "flag",
)


def builtin_categories() -> list[dict[str, Any]]:
    return [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(ADE20K_INSTANCE_NAMES, start=1)]


def read_categories(path: Path) -> list[dict[str, Any]]:
    """The ``"categories"`` list of an ``ade20k_instance_imgCatIds.json``."""
    data = read_json(path)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise InputError(path, "needs a non-empty 'categories' list")
    out, seen = [], set()
    for i, c in enumerate(cats):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool)
                and isinstance(c.get("name"), str)):
            raise InputError(path, f"category #{i}: needs an integer 'id' and a string 'name'")
        if not 1 <= c["id"] <= 255:
            raise InputError(path, f"category #{i}: id {c['id']} cannot be stored in the R channel (1..255)")
        if c["id"] in seen:
            raise InputError(path, f"duplicate category id {c['id']}")
        seen.add(c["id"])
        out.append({"id": c["id"], "name": c["name"], "supercategory": str(c.get("supercategory", ""))})
    return sorted(out, key=lambda c: c["id"])


def _instances(ann_path: Path, image: dict[str, Any], cat_ids: set[int]) -> list[dict[str, Any]]:
    """Annotations (ids from 0) of one instance PNG, in increasing instance-id (G) order."""
    raw = read_raw_label(ann_path)
    if raw.ndim != 3 or raw.shape[2] < 2 or raw.dtype != np.uint8:
        raise InputError(ann_path, f"expected an 8-bit RGB instance PNG (R = category, G = instance), got "
                                   f"shape {list(raw.shape)} {raw.dtype}")
    check_same_size(ann_path, raw.shape, image)
    cat, inst = raw[..., 0], raw[..., 1]
    # Each (instance, category) pair present, as one 16-bit code: G * 256 + R.
    codes = np.unique(inst.astype(np.uint16) * 256 + cat)
    codes = codes[codes >= 256]  # G == 0: not an instance
    inst_ids, inst_cats = (codes // 256).tolist(), (codes % 256).tolist()
    if len(set(inst_ids)) != len(inst_ids):
        dup = next(g for g in inst_ids if inst_ids.count(g) > 1)
        found = sorted(c for g, c in zip(inst_ids, inst_cats) if g == dup)
        raise InputError(ann_path, f"instance {dup} (G channel) spans several categories {found} (R channel)")
    for g, c in zip(inst_ids, inst_cats):
        if c not in cat_ids:
            raise InputError(ann_path, f"instance {g} has category {c} (R channel), not a known instance category")
    if not inst_ids:
        return []
    inst_t = cv2.transpose(np.ascontiguousarray(inst))  # column-major masks for the RLE encoder
    return masks_to_annotations(len(inst_ids), image["height"], image["width"],
                                lambda k, out: np.equal(inst_t, inst_ids[k], out=out), image["id"], inst_cats)


def convert(src: Path, split: str | None = None, verify_images: bool = True,
            workers: int | None = None) -> dict[str, Any]:
    """Convert one split (default ``training``; ``train``/``val`` accepted) of ADE20K."""
    src = require_dir(Path(src), "ADE20K folder")
    base = src / "ADEChallengeData2016" if (src / "ADEChallengeData2016").is_dir() else src
    split = parse_split(split, SPLITS, "ade20k", "training")
    img_dir = require_dir(base / "images" / split, f"images/{split} folder")
    ann_dir = require_dir(base / "annotations_instance" / split, f"annotations_instance/{split} folder")
    cat_file = next((p for p in (src / CATEGORIES_FILE, base / CATEGORIES_FILE) if p.is_file()), None)
    categories = read_categories(cat_file) if cat_file else builtin_categories()
    cat_ids = {c["id"] for c in categories}

    image_paths = sorted_by_rel((p for p in img_dir.iterdir() if p.is_file() and is_image_file(p)
                                 and not p.name.startswith(".")), src)
    if not image_paths:
        raise InputError(img_dir, "no image files found")
    pairs = []
    for ip in image_paths:
        ap = ann_dir / f"{ip.stem}.png"
        if not ap.is_file():
            raise InputError(ip, f"no instance annotation {ap.relative_to(src).as_posix()}")
        pairs.append((ip, ap))

    def load(job: tuple[int, tuple[Path, Path]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        image_id, (ip, ap) = job
        image = image_record(ip, src, image_id, verify_images)
        return image, _instances(ap, image, cat_ids)

    images, annotations = gather(load, pairs, f"ade20k {split}", workers)
    return coco_output("ade20k", src, images, annotations, categories)
