"""Reading images robustly: RGB/RGBA/palette/grayscale, 8- and 16-bit, corrupt files.

Every image leaves here as ``uint8`` ``[H,W,3]`` RGB so the rest of the pipeline has one
format. Images with more than 8 bits (16-bit microscopy, float TIFFs) are min-max stretched per
image: their raw range is arbitrary (a 12-bit sensor stored in 16 bits would otherwise be
almost black after a fixed /257).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from castseg.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Decompression-bomb protection stays on but at a size real datasets (gigapixel-ish
# histology tiles) do not hit.
Image.MAX_IMAGE_PIXELS = 50_000 * 50_000

_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pil_array(img: Image.Image) -> np.ndarray:
    """A PIL image's pixels in the dtype its mode holds: RGB (colour modes, alpha dropped), L
    (grey modes) or the raw 16-bit / 32-bit / float values (stretched later by :func:`to_rgb_uint8`)."""
    mode = img.mode
    if mode in ("RGB",):
        return np.asarray(img)
    if mode in ("RGBA", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    if mode in ("L", "LA", "1"):
        return np.asarray(img.convert("L"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        return arr.astype(np.uint16) if mode.startswith("I;16") and arr.dtype != np.uint16 else arr
    return np.asarray(img.convert("RGB"))


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``uint8`` ``[H,W,3]`` RGB.

    Alpha is dropped (not composited: microscopy RGBA files carry a constant alpha), grayscale
    is replicated to three channels, >8-bit data is stretched per image.
    Raises :class:`InputError` naming the file when it is missing, corrupt or truncated.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                arr = pil_array(img)
    except FileNotFoundError:
        raise InputError(path, "image file not found") from None
    except _READ_ERRORS as e:
        raise InputError(path, f"cannot read image (corrupt, truncated or not an image: {e})") from None
    return to_rgb_uint8(np.asarray(arr), path)


def to_rgb_uint8(arr: np.ndarray, source: str | Path | None = None) -> np.ndarray:
    """An image array as read from a file or handed over by a user → ``uint8`` ``[H,W,3]``.

    ``[H,W]`` and ``[H,W,1]`` are replicated to three channels, ``[H,W,4]`` loses its alpha;
    uint8 is kept, bool is 0/255, anything else (uint16, float) is min-max stretched per image.
    ``source`` names the image in the error for any other layout.
    """
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(source, f"unsupported image layout with shape {arr.shape} (expected [H,W], [H,W,3] "
                         "or [H,W,4])")
    # A writable copy: PIL-backed arrays are read-only, and torch.from_numpy warns on those.
    return np.array(arr, order="C")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the header only (no decoding)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise InputError(path, "image file not found") from None
    except _READ_ERRORS as e:
        raise InputError(path, f"cannot read image ({e})") from None
    return h, w


def read_label_image(path: str | Path) -> np.ndarray:
    """Read a label/mask image with its raw integer values (no colour conversion), ``[H,W]``."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA", "P", "LA"):
                arr = np.asarray(img.convert("RGBA" if img.mode == "RGBA" else img.mode))
            else:
                arr = np.asarray(img)
    except FileNotFoundError:
        raise InputError(path, "label image not found") from None
    except _READ_ERRORS as e:
        raise InputError(path, f"cannot read label image ({e})") from None
    if arr.ndim == 3:
        # A "binary" mask saved as RGB(A): inside wherever any colour channel is set.
        arr = arr[..., :3].max(axis=2)
    return arr
