"""A pseudo-label cache from predictions made elsewhere.

A teacher castseg cannot run here (a model served on a GPU cluster, another toolkit, a
human-in-the-loop tool) still teaches the student when its COCO results are brought in as a
cache: ``castseg pseudo-label --predictions R.json --images U.json --out P.json``. A COCO
*dataset* json (with ``annotations``) is taken too, every instance at score 1 (or its own
``score``): that is how the unlabeled images' own labels become a perfect teacher for
measurement. The cache and its manifest are the ones :func:`generate_pseudo_labels` writes, so
every stage reads it the same way; the manifest's teacher is the predictions file and its
sha256.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from castseg.data import masks as M
from castseg.data.coco_io import read_json, validate_coco, write_json
from castseg.data.dataset import UnlabeledImageDataset
from castseg.data.split import sha256_file
from castseg.errors import InputError
from castseg.pseudo_labels.cache import manifest_path, parts_dir
from castseg.pseudo_labels.generate import cache_classes, new_manifest, now, prepare_cache


def _records(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[int, str]]:
    """``(records, categories, file name by image id)`` of a results list or a COCO dataset
    (whose annotations score 1 unless they carry a ``score``; the last two empty for a list)."""
    raw = read_json(path)
    if isinstance(raw, list):
        return raw, [], {}
    if not isinstance(raw, dict) or "annotations" not in raw:
        raise InputError(path, "expected a COCO results list or a COCO json with 'annotations'")
    coco = validate_coco(raw, path)  # its own images_root: only its ids, names and sizes are used
    records = [{**a, "score": a.get("score", 1.0)} for a in coco.annotations]
    cats = [{"id": c["id"], "name": c["name"]} for c in coco.categories]
    return records, cats, {img["id"]: img["file_name"] for img in coco.images}


def _image_sizes(ds: UnlabeledImageDataset) -> dict[int, tuple[int, int]]:
    """``{image id: (H, W)}``, from the images json or, for a folder, each file's header."""
    sizes = {}
    for image_id, _, path, hw in ds.items:
        if hw is None:
            with Image.open(path) as im:
                hw = (im.height, im.width)
        sizes[image_id] = hw
    return sizes


def _check(r: Any, i: int, path: Path, sizes: dict[int, tuple[int, int]], cat_ids: set[int]) -> dict[str, Any]:
    """One record → a cache record (compressed RLE + bbox), or an :class:`InputError` naming it."""
    where = f"{path}: record #{i}"
    if not isinstance(r, dict) or not {"image_id", "category_id", "segmentation"} <= set(r):
        raise InputError(path, f"record #{i}: needs image_id, category_id, score and segmentation")
    if r["image_id"] not in sizes:
        raise InputError(path, f"record #{i}: image_id {r['image_id']!r} is not one of the images to label")
    if r["category_id"] not in cat_ids:
        raise InputError(path, f"record #{i}: category_id {r['category_id']!r} is not one of {sorted(cat_ids)}")
    score = r.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise InputError(path, f"record #{i}: score must be a finite number, got {score!r}")
    rle = M.segmentation_to_rle(r["segmentation"], *sizes[r["image_id"]], source=where)
    return {"image_id": r["image_id"], "category_id": r["category_id"], "score": float(score),
            "segmentation": rle, "bbox": M.bbox(rle)}


def import_pseudo_labels(predictions: str | Path, images: str | Path, out: str | Path, *,
                         images_root: str | Path | None = None, class_names: Sequence[str] | None = None,
                         min_score: float = 0.05, overwrite: bool = False) -> dict[str, Any]:
    """Write ``predictions`` (COCO results list, or COCO json with annotations) for ``images``
    (COCO json or folder) as the cache ``out``. Categories are the images json's; for a folder
    of images, a COCO json's own, else ``class_names`` as ids 1..C. Records below ``min_score``
    are dropped; a record for another image, an unknown category, a segmentation that does not fit its image or
    a COCO json with images not in ``images`` is an :class:`InputError`; a COCO json's images are
    matched to ``images`` by file name. A finished cache of
    the same predictions is reused, one of others refused unless ``overwrite``. Returns the
    manifest."""
    source, predictions, out = Path(images), Path(predictions), Path(out)
    ds = UnlabeledImageDataset(source, images_root, strong_view=False)
    records, pred_cats, pred_files = _records(predictions)
    if source.is_file() or not pred_cats:
        names, cats, _ = cache_classes(source, images_root, None, class_names)
    else:  # a folder of images has no categories: a COCO json's own are the cache's
        names, cats = [c["name"] for c in pred_cats], pred_cats
    if pred_files:  # a COCO json: its images are the images to label by file name, whatever their ids
        by_name = {it[1]: it[0] for it in ds.items}
        other = sorted(n for n in pred_files.values() if n not in by_name)
        if other:
            raise InputError(predictions, f"{len(other)} of its images are not images of {source} "
                             f"(first: {other[0]!r})")
        records = [{**r, "image_id": by_name[pred_files[r["image_id"]]]} for r in records]
    sizes, cat_ids = _image_sizes(ds), {c["id"] for c in cats}
    # every record is checked before anything is written: a bad file leaves no half-made cache
    kept = [_check(r, i, predictions, sizes, cat_ids) for i, r in enumerate(records)]
    kept = [r for r in kept if r["score"] >= min_score]
    info = {"sha256": sha256_file(predictions), "config": {"type": "predictions", "path": str(predictions)}}
    manifest = new_manifest(source, ds, info, names, cats, min_score, max_size=None, chunk_size=None)
    if prepare_cache(out, manifest, overwrite) == "done":
        return read_json(manifest_path(out))
    write_json(kept, out)
    manifest.update(finished=True, num_instances=len(kept), finished_at=now())
    write_json(manifest, manifest_path(out), indent=2)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return manifest
