"""Pieces every format converter shares: file listing, image records, masks → annotations,
and the output dict.

Conventions (so outputs are deterministic and comparable across formats):
- files are visited in the order of their POSIX path relative to the dataset root, image ids
  are 1..N in that order and annotation ids count up in the same order;
- ``file_name`` is relative to the dataset root with ``/`` separators, and the output carries
  the root as an absolute top-level ``"images_root"`` (the ``convert`` command rewrites it
  relative to wherever the json is written);
- ``area``/``bbox`` come from the compressed RLE (the evaluator's own code), so they agree
  with evaluation to the pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from faster_coco_eval.core import mask as _mask
from PIL import Image, UnidentifiedImageError

from castseg import __version__
from castseg.console import Progress, track
from castseg.data import masks as M
from castseg.data.images import image_size, read_image
from castseg.errors import InputError

T = TypeVar("T")
R = TypeVar("R")

# First key of every file we write; lets `castseg convert` recognise (and agree to overwrite)
# its own earlier output while refusing to clobber anything else in a dataset folder.
MARKER_KEY = "castseg"
MARKER_PREFIX = '{"info": {"' + MARKER_KEY + '": "convert'

# Bytes of masks built and encoded at once (per worker thread): a 1024² image with hundreds of
# instances would otherwise need gigabytes.
_ENCODE_CHUNK_BYTES = 64 * 1024 * 1024

_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def rel_posix(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def sorted_by_rel(paths: Iterable[Path], root: Path) -> list[Path]:
    """Sort by POSIX path relative to ``root``: the same order on every OS and file system."""
    return sorted(paths, key=lambda p: rel_posix(p, root))


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(path, f"{what} not found")
    if not path.is_dir():
        raise InputError(path, f"{what} must be a folder")
    return path


def progress(items: Sequence[T], desc: str) -> Iterator[T]:
    """Iterate with a progress bar on an interactive stderr; elsewhere (logs, CI) a plain line
    now and then on a long run (:class:`castseg.console.Progress`)."""
    yield from track(items, desc)


def image_record(path: Path, root: Path, image_id: int, verify: bool = True) -> dict[str, Any]:
    """COCO image entry for ``path``. With ``verify`` the pixels are decoded (catches corrupt
    and truncated files now rather than mid-training); otherwise only the header is read."""
    if verify:
        height, width = read_image(path).shape[:2]
    else:
        height, width = image_size(path)
    return {"id": image_id, "file_name": rel_posix(path, root), "width": int(width), "height": int(height)}


def read_raw_label(path: Path) -> np.ndarray:
    """Label/mask PNG with raw values and channels kept: ``[H,W]`` (L, I;16, I) or ``[H,W,C]``
    (RGB/RGBA, channels in RGB order). Corrupt or truncated files raise :class:`InputError`."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
            if img.mode.startswith("I;16") and arr.dtype != np.uint16:
                arr = arr.astype(np.uint16)
    except FileNotFoundError:
        raise InputError(path, "label image not found") from None
    except _READ_ERRORS as e:
        raise InputError(path, f"cannot read label image (corrupt, truncated or not an image: {e})") from None
    return arr


def check_same_size(label_path: Path, label_shape: tuple[int, ...], image: dict[str, Any]) -> None:
    h, w = int(label_shape[0]), int(label_shape[1])
    if (h, w) != (image["height"], image["width"]):
        raise InputError(label_path, f"mask size {w}x{h} differs from its image {image['file_name']!r} "
                                     f"({image['width']}x{image['height']})")


def encode_transposed(masks_t: np.ndarray) -> list[dict[str, Any]]:
    """Masks stored transposed, ``[N,W,H]`` C-contiguous ``uint8``/``bool`` in {0,1} → N
    compressed RLEs of the ``[H,W]`` masks.

    COCO RLE runs down columns, so the encoder wants each mask column-major. Building masks
    transposed from the start (``label.T == v``, or a decoded PNG written transposed) makes
    that layout free, where :func:`castseg.data.masks.encode_batch` on ``[N,H,W]`` pays a full
    3-D transposing copy — the single largest cost when converting ~29k DSB2018 masks.
    """
    if len(masks_t) == 0:
        return []
    m = np.ascontiguousarray(masks_t)
    if m.dtype == bool:
        m = m.view(np.uint8)
    elif m.dtype != np.uint8:
        m = (m != 0).view(np.uint8)
    rles = _mask.encode(m.transpose(2, 1, 0))  # [H,W,N], Fortran-contiguous: a view, no copy
    out = []
    for rle in rles:
        c = rle["counts"]
        out.append({"size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": c.decode("ascii") if isinstance(c, bytes) else c})
    return out


def masks_to_annotations(n: int, height: int, width: int, fill: Callable[[int, np.ndarray], None],
                         image_id: int, category_ids: Sequence[int], iscrowd: Sequence[int] | None = None,
                         sources: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Annotations (ids 1..n, to be renumbered by the caller) for the n instance masks of one
    ``height`` x ``width`` image.

    ``fill(i, out)`` writes mask i *transposed* into ``out`` (``bool`` ``[width, height]``):
    the column-major layout the RLE encoder wants (see :func:`encode_transposed`). Masks are
    built and encoded in chunks of at most ~64 MB, so hundreds of instances on a large image
    never need the whole ``[n,W,H]`` stack at once. An all-zero mask raises
    :class:`InputError` naming ``sources[i]`` (the file it came from): COCO has no meaning for
    an empty instance.
    """
    chunk = max(1, _ENCODE_CHUNK_BYTES // max(1, height * width))
    anns: list[dict[str, Any]] = []
    for s in range(0, n, chunk):
        stack = np.zeros((min(chunk, n - s), width, height), np.uint8)
        for k in range(len(stack)):
            fill(s + k, stack[k].view(bool))
        for k, rle in enumerate(encode_transposed(stack)):
            i = s + k
            a = M.area(rle)
            if a == 0:
                raise InputError(sources[i] if sources else f"image id={image_id}", "empty mask (no pixel set)")
            anns.append({
                "id": i + 1,
                "image_id": image_id,
                "category_id": int(category_ids[i]),
                "segmentation": rle,
                "area": float(a),
                "bbox": M.bbox(rle),
                "iscrowd": int(iscrowd[i]) if iscrowd is not None else 0,
            })
    return anns


def coco_output(fmt: str, root: Path, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
                categories: list[dict[str, Any]], info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The converted dataset as a COCO instances dict (``info`` first: see ``MARKER_PREFIX``)."""
    head: dict[str, Any] = {MARKER_KEY: f"convert {fmt}", "castseg_version": __version__,
                            "description": f"converted from {fmt} by castseg convert"}
    # The source's own info (a COCO file's description, licence...) wins over our defaults.
    head.update({k: v for k, v in (info or {}).items() if k not in (MARKER_KEY, "castseg_version")})
    return {
        "info": head,
        "images_root": Path(root).resolve().as_posix(),
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def parse_split(split: str | None, allowed: dict[str, str], fmt: str, default: str) -> str:
    """Map a user's ``--split`` (with aliases, e.g. ``val`` → ``validation``) to a folder name."""
    if split is None:
        return default
    if split not in allowed:
        raise InputError(None, f"{fmt}: unknown --split {split!r}; choose one of {sorted(set(allowed))}")
    return allowed[split]


def default_workers() -> int:
    """Threads for per-image work: PNG/JPEG decoding and numpy release the GIL, so a few
    threads cut wall time on multi-core machines; capped because disks rarely keep up beyond."""
    import os

    return max(1, min(4, os.cpu_count() or 1))


def parallel_map(fn: Callable[[T], R], items: Sequence[T], desc: str, workers: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, results in input order, with a progress bar.

    At most ``2 * workers`` items are in flight, so memory stays bounded however slow the
    consumer. The first error (in input order) propagates and pending work is cancelled.
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(items) <= 1:
        for item in progress(items, desc):
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    bar = Progress(len(items), desc)
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            bar.update(1)
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def gather(load: Callable[[tuple[int, T]], tuple[dict[str, Any], list[dict[str, Any]]]], items: Sequence[T],
           desc: str, workers: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``load((image_id, item))`` for every item (image ids 1..N in item order) and number the
    annotations 1..M in the same order, so ids are stable whatever the thread scheduling."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image, anns in parallel_map(load, list(enumerate(items, start=1)), desc, workers):
        images.append(image)
        for a in anns:
            a["id"] = len(annotations) + 1
            annotations.append(a)
    return images, annotations
