"""``yolo-seg``: Ultralytics segmentation layout.

::

    SRC/images/[<split>/]*.jpg|png...
    SRC/labels/[<split>/]*.txt      one line per instance: ``cls x1 y1 x2 y2 ...``,
                                    polygon vertices normalised to [0, 1]
    SRC/data.yaml                   ``names:`` as a list or a {index: name} dict

Labels mirror images (``images/a/b.jpg`` ↔ ``labels/a/b.txt``); an image without a label file
is a background image (no annotations). COCO category id = YOLO class index + 1 (COCO ids
start at 1). Segmentations stay polygons (in pixels), as given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from castseg.data import masks as M
from castseg.data.convert._common import (
    coco_output,
    gather,
    image_record,
    require_dir,
    sorted_by_rel,
)
from castseg.data.images import is_image_file
from castseg.errors import InputError

# Exporters write 1.0000001 or -1e-7 after float round-trips; beyond this it is a real error
# (e.g. pixel coordinates in a file that should be normalised).
_RANGE_TOL = 0.01


def find_names_file(src: Path) -> Path:
    """``SRC/data.yaml``, else the single ``*.yaml``/``*.yml`` in SRC."""
    default = src / "data.yaml"
    if default.is_file():
        return default
    found = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in (".yaml", ".yml"))
    if len(found) == 1:
        return found[0]
    why = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
    raise InputError(src, f"{why} *.yaml files with class names here; pass --names data.yaml")


def read_names(path: Path) -> dict[int, str]:
    """Class index → name from an Ultralytics dataset yaml."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "names file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        out = dict(enumerate(names))
    elif isinstance(names, dict):
        try:
            out = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise InputError(path, "'names' keys must be class indices (0, 1, ...)") from None
    else:
        raise InputError(path, "needs a 'names:' entry (a list, or a {index: name} mapping)")
    if not out:
        raise InputError(path, "'names' is empty")
    if any(k < 0 for k in out) or any(not isinstance(v, (str, int)) or str(v) == "" for v in out.values()):
        raise InputError(path, "'names' must map non-negative indices to non-empty names")
    return {k: str(v) for k, v in sorted(out.items())}


def _parse_labels(label: Path, image: dict[str, Any], names: dict[int, str]) -> list[dict[str, Any]]:
    """Annotations (ids still 0) of one label file, polygons scaled to the image's pixels."""
    try:
        text = label.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(label, "not a UTF-8 text file") from None
    w, h = image["width"], image["height"]
    anns = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"line {lineno}"
        try:
            cls = int(tokens[0])
            coords = [float(t) for t in tokens[1:]]
        except ValueError:
            raise InputError(label, f"{where}: expected 'class x1 y1 x2 y2 ...' with an integer class "
                                    f"and numeric coordinates, got {line.strip()[:60]!r}") from None
        if cls not in names:
            raise InputError(label, f"{where}: class index {cls} is not in names (known: {min(names)}..{max(names)})")
        if len(coords) % 2:
            raise InputError(label, f"{where}: odd number of coordinates ({len(coords)}); expected x y pairs")
        if len(coords) < 6:
            hint = " (this looks like a detection box 'cx cy w h'; yolo-seg needs polygons)" if len(coords) == 4 else ""
            raise InputError(label, f"{where}: polygon has {len(coords) // 2} points; at least 3 are needed{hint}")
        if not all(math.isfinite(c) and -_RANGE_TOL <= c <= 1 + _RANGE_TOL for c in coords):
            raise InputError(label, f"{where}: coordinates must be normalised to [0, 1]")
        poly = []
        for i, c in enumerate(coords):
            scale = w if i % 2 == 0 else h
            poly.append(round(min(max(c, 0.0), 1.0) * scale, 3))
        rle = M.segmentation_to_rle([poly], h, w, f"{label}: {where}")
        area = M.area(rle)
        if area == 0:
            raise InputError(label, f"{where}: polygon encloses no pixel (zero area)")
        anns.append({"id": 0, "image_id": image["id"], "category_id": cls + 1, "segmentation": [poly],
                     "area": float(area), "bbox": M.bbox(rle), "iscrowd": 0})
    return anns


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def convert(src: Path, names: Path | None = None, split: str | None = None, verify_images: bool = True,
            workers: int | None = None) -> dict[str, Any]:
    """Convert an Ultralytics segmentation dataset rooted at ``src`` (all splits, or only
    ``images/<split>`` when ``split`` is given) to a COCO instances dict."""
    src = require_dir(Path(src), "yolo-seg dataset folder")
    class_names = read_names(Path(names) if names else find_names_file(src))
    images_dir = require_dir(src / "images", "images/ folder")
    labels_dir = require_dir(src / "labels", "labels/ folder")
    if split:
        images_dir = require_dir(images_dir / split, f"split folder images/{split}")
        labels_dir = labels_dir / split
    image_paths = sorted_by_rel((p for p in images_dir.rglob("*") if p.is_file() and is_image_file(p)
                                 and _visible(p.relative_to(images_dir))), src)
    if not image_paths:
        raise InputError(images_dir, "no image files found")

    label_of: dict[Path, Path] = {}
    image_of: dict[Path, Path] = {}
    for p in image_paths:
        label = labels_dir / p.relative_to(images_dir).with_suffix(".txt")
        if label in image_of:  # a.jpg and a.png would silently share a.txt
            raise InputError(p, f"shares its label file {label.name} with {image_of[label].name}; rename one")
        label_of[p], image_of[label] = label, p
    if labels_dir.is_dir() and not any(lbl.is_file() for lbl in label_of.values()) \
            and any(labels_dir.rglob("*.txt")):
        raise InputError(labels_dir, "no label file matches an image; labels/ must mirror images/ "
                                     "(images/x/a.jpg ↔ labels/x/a.txt)")

    def load(job: tuple[int, Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        image_id, path = job
        image = image_record(path, src, image_id, verify_images)
        label = label_of[path]
        return image, (_parse_labels(label, image, class_names) if label.is_file() else [])

    images, annotations = gather(load, image_paths, "yolo-seg", workers)
    categories = [{"id": k + 1, "name": v, "supercategory": ""} for k, v in class_names.items()]
    return coco_output("yolo-seg", src, images, annotations, categories)
