"""COCO results files: the one format every predictor writes and every evaluator reads.

A results file is a JSON list of records, one per predicted instance::

    {"image_id": int, "category_id": int, "score": float,
     "segmentation": {"size": [H, W], "counts": str},   # compressed RLE (segm)
     "bbox": [x, y, w, h]}                               # (bbox)

:func:`instances_to_results` builds records from model outputs, :func:`write_results` saves
them atomically and :func:`load_results` / :func:`validate_results` check them against the
ground truth so a bad file fails with one line naming the file and the record index.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from faster_coco_eval.core import mask as _mask

from castseg.data import masks as M
from castseg.data.coco_io import CocoData, read_json, write_json
from castseg.errors import InputError

IOU_TYPES = ("segm", "bbox")


def _to_numpy(x: Any) -> np.ndarray:
    # Accept torch tensors without importing torch here (the evaluator must not need it).
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def instances_to_results(image_id: int, masks: Any, scores: Any, labels: Any) -> list[dict[str, Any]]:
    """Predicted instances of one image → COCO result records.

    Args:
        image_id: the GT image id the predictions belong to.
        masks: ``[N, H, W]`` binary masks (bool, or numbers where nonzero is foreground), numpy
            or torch (any device).
        scores: ``[N]`` confidences.
        labels: ``[N]`` COCO category ids (not contiguous class indices).

    Returns:
        N records with compressed-RLE ``segmentation``, ``bbox`` ``[x, y, w, h]`` of the mask,
        ``score`` and ``category_id``; empty masks are kept (they only cost precision).
    """
    m, s, lab = _to_numpy(masks), _to_numpy(scores).reshape(-1), _to_numpy(labels).reshape(-1)
    if m.size == 0 and len(s) == 0 and len(lab) == 0:
        return []  # "no detections" often arrives as an untyped empty array
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {list(m.shape)}")
    n = m.shape[0]
    if not (n == len(s) == len(lab)):
        raise ValueError(f"got {n} masks, {len(s)} scores and {len(lab)} labels; they must match")
    rles = M.encode_batch(m)
    return [{"image_id": int(image_id), "category_id": int(lab[i]), "score": float(s[i]),
             "segmentation": rle, "bbox": M.bbox(rle)} for i, rle in enumerate(rles)]


def write_results(results: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Save result records as a JSON list (atomically: a crash never leaves half a file)."""
    write_json(list(results), path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_segmentation(segm: Any, image: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    h, w = image["height"], image["width"]
    if isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        # Compressed RLE is what predictors write; checking the size here and parsing the counts
        # in one batch (_check_counts) keeps a 500k-record file fast: a full decode per record
        # would dominate evaluation time.
        size = segm.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and [size[0], size[1]] == [h, w]):
            raise InputError(source, f"{where}: RLE size {size} does not match image {image['id']} "
                             f"size [{h}, {w}]")
        counts = segm["counts"]
        return {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    # Polygons and uncompressed RLE are rarer in results; normalise them to compressed RLE,
    # which is the only segmentation form COCO's loadRes accepts.
    return M.segmentation_to_rle(segm, h, w, f"{source}: {where}")


def validate_results(records: Any, gt: CocoData, iou_type: str = "segm",
                     source: str | Path = "<predictions>") -> list[dict[str, Any]]:
    """Check parsed result records against ``gt``; return normalised copies.

    Each record must have ``image_id`` (an image of ``gt``), ``category_id`` (a category of
    ``gt``), a finite ``score`` and, depending on ``iou_type``, a ``segmentation`` (``"segm"``)
    or a ``bbox`` ``[x, y, w, h]`` with ``w, h >= 0`` (``"bbox"``). The other geometry key is
    checked and kept when present. An empty list is valid. Raises :class:`InputError` naming
    ``source`` and the record index.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    src = str(source)
    if not isinstance(records, list):
        raise InputError(src, f"not a COCO results file (top level is a {type(records).__name__}, "
                         "expected a JSON list of result records)")
    cat_ids = {c["id"] for c in gt.categories}
    need = ("image_id", "category_id", "score", "segmentation" if iou_type == "segm" else "bbox")
    out = []
    for i, rec in enumerate(records):
        where = f"record #{i}"
        if not isinstance(rec, dict):
            raise InputError(src, f"{where}: must be an object, got {type(rec).__name__}")
        for key in need:
            if key not in rec:
                raise InputError(src, f"{where}: missing key '{key}' (needed for {iou_type} evaluation)")
        image = gt.image_by_id.get(rec["image_id"]) if not isinstance(rec["image_id"], bool) else None
        if image is None:
            raise InputError(src, f"{where}: image_id {rec['image_id']!r} is not an image of the ground "
                             f"truth {gt.path}")
        if rec["category_id"] not in cat_ids or isinstance(rec["category_id"], bool):
            raise InputError(src, f"{where}: category_id {rec['category_id']!r} is not a category of the "
                             f"ground truth {gt.path}")
        if not _is_number(rec["score"]):
            raise InputError(src, f"{where}: score must be a finite number, got {rec['score']!r}")
        norm: dict[str, Any] = {"image_id": rec["image_id"], "category_id": rec["category_id"],
                                "score": float(rec["score"])}
        if "segmentation" in rec:
            norm["segmentation"] = _check_segmentation(rec["segmentation"], image, src, where)
        if "bbox" in rec:
            b = rec["bbox"]
            if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b)):
                raise InputError(src, f"{where}: bbox must be [x, y, w, h] (4 finite numbers), got {b!r}")
            if b[2] < 0 or b[3] < 0:
                raise InputError(src, f"{where}: bbox width and height must be >= 0, got {list(b)}")
            norm["bbox"] = [float(v) for v in b]
        out.append(norm)
    _check_counts(out, src)
    return out


def _check_counts(records: list[dict[str, Any]], source: str) -> None:
    """Reject compressed RLE strings the C parser cannot read, naming the first bad record.

    One batched call parses all strings (no pixels are decoded); only on failure do we go
    record by record to find the culprit, so valid files pay ~5 us per record.
    """
    rles = [r["segmentation"] for r in records if "segmentation" in r]
    try:
        if rles:
            _mask.area(rles)
        return
    except Exception:  # the C parser reports malformed strings as RuntimeError/ValueError
        pass
    for i, r in enumerate(records):
        try:
            if "segmentation" in r:
                _mask.area([r["segmentation"]])
        except Exception as e:
            raise InputError(source, f"record #{i}: RLE counts cannot be parsed ({e})") from None


def load_results(path: str | Path, gt: CocoData, iou_type: str = "segm") -> list[dict[str, Any]]:
    """Read and validate a COCO results json against ``gt`` (see :func:`validate_results`)."""
    return validate_results(read_json(path), gt, iou_type, path)
