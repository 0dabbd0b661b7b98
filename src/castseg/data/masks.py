"""Mask encodings: binary masks ↔ COCO RLE ↔ polygons, and their area/bbox.

Thin, validated wrappers over faster-coco-eval's C mask API (the same code its evaluator uses,
so areas and IoUs agree with evaluation to the bit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faster_coco_eval.core import mask as _mask

try:  # expands RLE counts to run lengths in C, without painting the mask
    from faster_coco_eval.mask_api_new_cpp import toUncompressedRLE as _to_uncompressed
except ImportError:  # pragma: no cover - other faster-coco-eval builds
    _to_uncompressed = None

from castseg.errors import InputError


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Binary mask ``[H,W]`` → compressed RLE ``{"size": [H,W], "counts": str}``."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8) != 0, dtype=np.uint8)
    rle = _mask.encode(m)
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode_batch(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks ``[N,H,W]`` → list of N compressed RLEs."""
    if len(masks) == 0:
        return []
    m = np.asfortranarray(np.moveaxis(np.asarray(masks) != 0, 0, -1), dtype=np.uint8)
    out = []
    for rle in _mask.encode(m):
        c = rle["counts"]
        out.append({"size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": c.decode("ascii") if isinstance(c, bytes) else c})
    return out


def _as_c_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _rle_pixel_count(rle: dict[str, Any]) -> int:
    """Pixels covered by a compressed RLE's runs (-1 if a run is negative), without painting the
    mask: validating a 29k-annotation file this way takes 0.2 s instead of ~40 s of decodes."""
    if _to_uncompressed is None:  # pragma: no cover - faster-coco-eval without the C helper
        m = decode(rle)
        return int(m.shape[0] * m.shape[1])
    runs = _to_uncompressed([_as_c_rle(rle)])[0]["counts"]
    return sum(runs) if all(r >= 0 for r in runs) else -1


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Compressed RLE → ``uint8`` ``[H,W]`` in {0,1}."""
    return np.ascontiguousarray(_mask.decode(_as_c_rle(rle)))


def area(rle: dict[str, Any]) -> int:
    return int(_mask.area(_as_c_rle(rle)))


def bbox(rle: dict[str, Any]) -> list[float]:
    """``[x, y, w, h]`` of the mask (COCO convention)."""
    return [float(v) for v in _mask.toBbox(_as_c_rle(rle))]


def overlap(dt: list[dict[str, Any]], gt: list[dict[str, Any]], inside: bool = False) -> np.ndarray:
    """``[len(dt), len(gt)]`` mask IoU of compressed RLEs, or with ``inside`` the share of each
    ``dt`` mask that lies in each ``gt`` mask (|dt ∩ gt| / |dt|: COCO's crowd overlap)."""
    if not dt or not gt:
        return np.zeros((len(dt), len(gt)))
    out = _mask.iou([_as_c_rle(r) for r in dt], [_as_c_rle(r) for r in gt], [int(inside)] * len(gt))
    return np.asarray(out, dtype=np.float64).reshape(len(dt), len(gt))


def union(rles: list[dict[str, Any]]) -> dict[str, Any]:
    """One compressed RLE covering every mask of ``rles`` (same size; at least one)."""
    merged = _mask.merge([_as_c_rle(r) for r in rles], intersect=False)
    counts = merged["counts"]
    return {"size": [int(v) for v in merged["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def segmentation_to_rle(segm: Any, height: int, width: int, source: str = "") -> dict[str, Any]:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) → compressed RLE.

    Raises :class:`InputError` (prefixed with ``source``) for polygons with fewer than 3 points
    and RLEs whose size is not the image's ``[height, width]``.
    """
    if isinstance(segm, list):
        if len(segm) == 0:
            raise InputError(source, "segmentation is an empty polygon list")
        polys = []
        for poly in segm:
            if not isinstance(poly, (list, tuple)) or not all(isinstance(v, (int, float)) for v in poly):
                raise InputError(source, "polygon must be a flat list of numbers [x1, y1, x2, y2, ...]")
            if len(poly) % 2 != 0:
                raise InputError(source, f"polygon has an odd number of coordinates ({len(poly)})")
            if len(poly) < 6:
                raise InputError(source, f"polygon has {len(poly) // 2} points; at least 3 are needed")
            polys.append([float(v) for v in poly])
        rles = _mask.frPyObjects(polys, height, width)
        merged = _mask.merge(rles)
        c = merged["counts"]
        return {"size": [height, width], "counts": c.decode("ascii") if isinstance(c, bytes) else c}
    if isinstance(segm, dict):
        if "size" not in segm or "counts" not in segm:
            raise InputError(source, "RLE segmentation needs 'size' and 'counts'")
        size = segm["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2) or [int(size[0]), int(size[1])] != [height, width]:
            raise InputError(source, f"RLE size {size} does not match the image size [{height}, {width}]")
        counts = segm["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != height * width:
                raise InputError(source, f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
            rle = _mask.frPyObjects(segm, height, width)
            c = rle["counts"]
            return {"size": [height, width], "counts": c.decode("ascii") if isinstance(c, bytes) else c}
        if isinstance(counts, (str, bytes)):
            out = {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
            try:
                total = _rle_pixel_count(out)
            except Exception as e:  # the C decoder rejects malformed strings with assorted errors
                raise InputError(source, f"RLE counts cannot be decoded ({e})") from None
            if total != height * width:
                raise InputError(source, f"RLE counts cover {total} pixels, expected {height}x{width} = {height * width}")
            return out
        raise InputError(source, "RLE 'counts' must be a string or a list of integers")
    raise InputError(source, f"segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}")


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.0) -> list[list[float]]:
    """Outer contours of a binary mask as COCO polygons (used only for display/export)."""
    import cv2

    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if tolerance > 0:
            c = cv2.approxPolyDP(c, tolerance, True)
        if len(c) >= 3:
            polys.append(c.reshape(-1).astype(float).tolist())
    return polys
