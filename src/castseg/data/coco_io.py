"""Reading, validating and writing COCO instances files.

Every command that reads a COCO json goes through :func:`load_coco`, so every malformed input
gets the same one-line error naming the file and the record (see :mod:`castseg.errors`). File
names resolve against ``images_root`` (default: the json's top-level ``"images_root"`` key,
relative to the json, else the json's own directory) and may not escape it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from castseg.atomic import atomic_open
from castseg.data import masks as M
from castseg.errors import InputError


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a json file") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise InputError(path, "not valid JSON (not UTF-8 text)") from None


def write_json(obj: Any, path: str | Path, indent: int | None = None) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)


def resolve_in_root(root: str | Path, file_name: str, source: str = "") -> Path:
    """``root / file_name``, refusing names that escape ``root`` (``../``, absolute paths).

    Containment is checked on the normalised path, not the symlink-resolved one: dataset
    folders that are symlinks to other disks are common and legitimate; what we refuse is a
    *name* that walks out of the root.
    """
    if not isinstance(file_name, str) or not file_name:
        raise InputError(source, "file_name must be a non-empty string")
    root_abs = os.path.abspath(root)
    candidate = os.path.normpath(os.path.join(root_abs, file_name))
    if os.path.isabs(file_name) or os.path.commonpath([root_abs, candidate]) != root_abs:
        raise InputError(source, f"file_name {file_name!r} escapes the images root {root_abs!r}")
    return Path(candidate)


def is_int(v: Any) -> bool:
    """A json integer (``true`` is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class CocoData:
    """A validated COCO instances file. ``annotations`` carry a compressed-RLE ``_rle``-free
    normalised form: ``area``/``bbox`` recomputed from the segmentation, ``iscrowd`` an int."""

    path: Path
    images_root: Path
    info: dict[str, Any]
    images: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_by_id = {img["id"]: img for img in self.images}
        self.anns_by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in self.images}
        for ann in self.annotations:
            self.anns_by_image[ann["image_id"]].append(ann)

    def image_path(self, image: dict[str, Any]) -> Path:
        return resolve_in_root(self.images_root, image["file_name"], f"{self.path}: image id={image['id']}")

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def to_dict(self, with_annotations: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["info"] = self.info
        out["images"] = self.images
        if with_annotations:
            out["annotations"] = self.annotations
        out["categories"] = self.categories
        return out


def _check_unique(records: Iterable[dict[str, Any]], key: str, what: str, path: Path) -> None:
    seen: set[Any] = set()
    for rec in records:
        v = rec[key]
        if v in seen:
            raise InputError(path, f"duplicate {what} {key} {v!r}")
        seen.add(v)


def validate_coco(data: Any, path: str | Path, images_root: str | Path | None = None,
                  require_annotations: bool = True) -> CocoData:
    """Validate an already-parsed COCO instances dict; see :func:`load_coco`."""
    path = Path(path)
    if not isinstance(data, dict):
        raise InputError(path, f"not a COCO instances file (top level is a {type(data).__name__}, expected an object)")
    for key in ("images", "categories") + (("annotations",) if require_annotations else ()):
        if key not in data:
            raise InputError(path, f"not a COCO instances file: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise InputError(path, f"'{key}' must be a list")
    root = _images_root(data, path, images_root)
    images = _validate_images(data["images"], path, root)
    categories = _validate_categories(data["categories"], path)
    image_by_id = {img["id"]: img for img in images}
    cat_ids = {c["id"] for c in categories}
    raw = data.get("annotations", []) if require_annotations or "annotations" in data else []
    annotations = [_validate_annotation(ann, i, path, image_by_id, cat_ids) for i, ann in enumerate(raw)]
    _check_unique(annotations, "id", "annotation", path)
    # "images_root" is not carried in `extra`: it is relative to *this* file's folder, so a writer
    # saving elsewhere must set it anew (see images_root_entry).
    known = {"info", "images", "annotations", "categories", "images_root"}
    extra = {k: v for k, v in data.items() if k not in known}
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return CocoData(path, root, info, images, categories, annotations, extra)


def _images_root(data: dict, path: Path, images_root: str | Path | None) -> Path:
    """The folder the ``file_name``s are relative to: the caller's, the json's own ``images_root``, or its folder."""
    if images_root is not None:
        return Path(images_root)
    if "images_root" in data:
        # Written by `castseg split` (and any writer whose json lives away from the images):
        # a folder relative to this json's folder, or absolute.
        if not isinstance(data["images_root"], str) or not data["images_root"]:
            raise InputError(path, "'images_root' must be a non-empty string (a folder path)")
        return path.parent / data["images_root"]
    return path.parent


def _where(kind: str, i: int, record: Any) -> str:
    """How an error names a record: ``image #3 (id=7)``."""
    return f"{kind} #{i}" + (f" (id={record.get('id')})" if isinstance(record, dict) and "id" in record else "")


def check_record(record: Any, where: str, keys: tuple[str, ...], path: Path) -> None:
    """A json object with ``keys`` and an integer ``id``, or one line naming ``where`` it is not."""
    if not isinstance(record, dict):
        raise InputError(path, f"{where}: must be an object")
    for key in keys:
        if key not in record:
            raise InputError(path, f"{where}: missing key '{key}'")
    if not is_int(record["id"]):
        raise InputError(path, f"{where}: 'id' must be an integer")


def annotation_refs(ann: Any, i: int, path: Path, image_by_id: dict, cat_ids: set,
                    keys: tuple[str, ...]) -> tuple[str, dict]:
    """``(where, image)`` of annotation #i after checking its keys, its image and its category;
    shared by :func:`load_coco` and the evaluator's ground-truth check."""
    where = _where("annotation", i, ann)
    check_record(ann, where, keys, path)
    img = image_by_id.get(ann["image_id"])
    if img is None:
        raise InputError(path, f"{where}: image_id {ann['image_id']!r} is not in 'images'")
    if ann["category_id"] not in cat_ids:
        raise InputError(path, f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
    return where, img


def _validate_images(records: list, path: Path, root: Path) -> list[dict]:
    images = []
    for i, img in enumerate(records):
        where = _where("image", i, img)
        check_record(img, where, ("id", "file_name", "width", "height"), path)
        if not (is_int(img["width"]) and is_int(img["height"]) and img["width"] > 0 and img["height"] > 0):
            raise InputError(path, f"{where}: 'width' and 'height' must be positive integers")
        resolve_in_root(root, img["file_name"], f"{path}: {where}")
        images.append(img)
    _check_unique(images, "id", "image", path)
    _check_unique(images, "file_name", "image", path)
    return images


def _validate_categories(records: list, path: Path) -> list[dict]:
    categories = []
    for i, cat in enumerate(records):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise InputError(path, f"category #{i}: needs 'id' and 'name'")
        if not is_int(cat["id"]):
            raise InputError(path, f"category #{i} ({cat.get('name')!r}): 'id' must be an integer")
        categories.append({"id": cat["id"], "name": str(cat["name"]), "supercategory": cat.get("supercategory", "")})
    _check_unique(categories, "id", "category", path)
    return categories


def _validate_annotation(ann: Any, i: int, path: Path, image_by_id: dict, cat_ids: set) -> dict:
    """One annotation, normalised: compressed RLE (polygons kept), area and bbox from the mask."""
    where, img = annotation_refs(ann, i, path, image_by_id, cat_ids, ("id", "image_id", "category_id", "segmentation"))
    rle = M.segmentation_to_rle(ann["segmentation"], img["height"], img["width"], f"{path}: {where}")
    a = M.area(rle)
    if a == 0:
        raise InputError(path, f"{where}: empty mask (area 0)")
    norm = {
        "id": ann["id"],
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        # Polygons stay polygons (they are what the user gave); RLE is normalised to compressed.
        "segmentation": ann["segmentation"] if isinstance(ann["segmentation"], list) else rle,
        "area": float(a),
        "bbox": M.bbox(rle),
        "iscrowd": int(bool(ann.get("iscrowd", 0))),
    }
    if "score" in ann:
        norm["score"] = float(ann["score"])
    return norm


def load_coco(path: str | Path, images_root: str | Path | None = None,
              require_annotations: bool = True) -> CocoData:
    """Read and validate a COCO instances json.

    ``images_root`` defaults to the json's top-level ``"images_root"`` key (relative to the
    json's folder) if it has one, else to the json's own directory. With
    ``require_annotations=False`` an image-list json (an unlabeled split) is accepted. Raises
    :class:`InputError` on: invalid JSON, non-COCO structure, missing keys, duplicate ids/file
    names, annotations pointing at unknown images or categories, polygons with < 3 points, RLE
    of the wrong size, empty masks, file names escaping ``images_root``.
    """
    return validate_coco(read_json(path), path, images_root, require_annotations)


def images_root_entry(images_root: str | Path, out_dir: str | Path) -> str:
    """Value for a top-level ``"images_root"`` key in a json written to ``out_dir``: the path
    of ``images_root`` relative to ``out_dir`` (absolute where no relative path exists, e.g.
    another Windows drive), with ``/`` separators so the file is portable."""
    root, out = Path(images_root).resolve(), Path(out_dir).resolve()
    try:
        return Path(os.path.relpath(root, out)).as_posix()
    except ValueError:
        return root.as_posix()


def annotation_rle(ann: dict[str, Any], image: dict[str, Any]) -> dict[str, Any]:
    """Compressed RLE of a (validated) annotation."""
    seg = ann["segmentation"]
    if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
        return seg
    return M.segmentation_to_rle(seg, image["height"], image["width"])
