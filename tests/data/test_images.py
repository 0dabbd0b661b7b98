from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from castseg.data.images import image_size, read_image
from castseg.errors import InputError


def test_rgba_drops_alpha(tmp_path: Path):
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 17
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (5, 6, 3) and img.dtype == np.uint8
    assert (img[..., 0] == 200).all() and (img[..., 1:] == 0).all()


def test_grayscale_replicated(tmp_path: Path):
    g = np.arange(30, dtype=np.uint8).reshape(5, 6)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (5, 6, 3)
    assert all((img[..., c] == g).all() for c in range(3))
    assert image_size(tmp_path / "g.png") == (5, 6)


def test_16bit_stretched_to_full_range(tmp_path: Path):
    # A 12-bit sensor stored in 16 bits: a fixed /257 would leave it nearly black.
    g = np.linspace(100, 4000, 5 * 6).reshape(5, 6).astype(np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    assert (np.diff(img[..., 0].reshape(-1).astype(int)) >= 0).all()  # order preserved


@pytest.mark.parametrize("content", [b"not an image at all", b""])
def test_corrupt_image_names_file(tmp_path: Path, content: bytes):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(InputError, match="bad.png"):
        read_image(p)


def test_truncated_png_names_file(tmp_path: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.png.*cannot read image"):
        read_image(tmp_path / "trunc.png")


def test_missing_image(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.png")
