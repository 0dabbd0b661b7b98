"""``mask-folders``: one folder per image with one binary PNG per instance (DSB2018 layout).

::

    SRC/<id>/images/<id>.png      the image (any name; exactly one image file)
    SRC/<id>/masks/*.png          one mask per instance, nonzero = inside

A single class. Overlapping instance masks are kept as given (COCO allows overlap; the six
DSB2018 images that have it are genuine touching-nuclei ambiguities, not errors to "fix").
A sample without a ``masks/`` folder becomes an image with no annotations.
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
    read_raw_label,
    require_dir,
    sorted_by_rel,
)
from castseg.data.images import is_image_file
from castseg.errors import InputError

LAYOUT = "expected <id>/images/<image file> and <id>/masks/*.png"


def _visible(p: Path) -> bool:
    # .DS_Store, ._foo.png (macOS resource forks), .ipynb_checkpoints: never data.
    return not p.name.startswith(".")


def _read_mask(path: Path) -> np.ndarray:
    """Instance mask ``[H,W]`` of raw values (nonzero = inside).

    OpenCV decodes these small PNGs faster than PIL (this is the hot loop: ~29k files for
    DSB2018); anything it cannot decode goes through PIL for a precise error message.
    """
    try:
        buf = np.fromfile(path, np.uint8)
    except FileNotFoundError:
        raise InputError(path, "mask file not found") from None
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if arr is None:
        arr = read_raw_label(path)  # raises InputError naming the file if PIL cannot read it either
    if arr.ndim == 3:
        # A mask saved as colour: inside wherever any colour channel is set (alpha ignored:
        # it is often a constant 255).
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return arr


def _transpose(m: np.ndarray) -> np.ndarray:
    # cv2.transpose is SIMD-blocked (several times faster than numpy's copy of m.T) but only
    # takes the dtypes OpenCV knows.
    if m.dtype in (np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64):
        return cv2.transpose(np.ascontiguousarray(m))
    return np.ascontiguousarray(m.T)


def _find_samples(src: Path) -> list[tuple[Path, Path, list[Path]]]:
    """``[(sample_dir, image_path, mask_paths)]`` in sorted order."""
    samples = []
    dirs = sorted_by_rel((d for d in src.iterdir() if d.is_dir() and _visible(d)), src)
    for d in dirs:
        img_dir = d / "images"
        if not img_dir.is_dir():
            raise InputError(d, f"not a mask-folders sample: no images/ subfolder ({LAYOUT})")
        images = sorted_by_rel((p for p in img_dir.iterdir() if p.is_file() and _visible(p) and is_image_file(p)),
                               src)
        if len(images) != 1:
            found = ", ".join(p.name for p in images) or "none"
            raise InputError(img_dir, f"expected exactly one image file, found {len(images)} ({found})")
        mask_dir = d / "masks"
        masks = []
        if mask_dir.is_dir():
            masks = sorted_by_rel((p for p in mask_dir.iterdir() if p.is_file() and _visible(p) and is_image_file(p)),
                                  src)
        samples.append((d, images[0], masks))
    if not samples:
        raise InputError(src, f"no sample folders found ({LAYOUT})")
    return samples


def convert(src: Path, class_name: str = "nucleus", verify_images: bool = True,
            workers: int | None = None) -> dict[str, Any]:
    """Convert a mask-folders dataset rooted at ``src`` to a COCO instances dict."""
    src = require_dir(Path(src), "mask-folders dataset folder")
    if not class_name or not class_name.strip():
        raise InputError(None, "--class-name must be a non-empty name")
    samples = _find_samples(src)

    def load(job: tuple[int, tuple[Path, Path, list[Path]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        image_id, (_, image_path, mask_paths) = job
        image = image_record(image_path, src, image_id, verify_images)

        def fill(k: int, out: np.ndarray) -> None:
            m = _read_mask(mask_paths[k])
            check_same_size(mask_paths[k], m.shape, image)
            np.not_equal(_transpose(m), 0, out=out)

        anns = masks_to_annotations(len(mask_paths), image["height"], image["width"], fill, image_id,
                                    [1] * len(mask_paths), sources=[str(p) for p in mask_paths])
        return image, anns

    images, annotations = gather(load, samples, "mask-folders", workers)
    categories = [{"id": 1, "name": class_name.strip(), "supercategory": ""}]
    return coco_output("mask-folders", src, images, annotations, categories)

