"""Shared fixtures. Tests run offline, on CPU, in seconds; data from ../shared skips cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CASTSEG_SHARED", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"
DSB_DIR = SHARED_DATA / "dsb2018-stage1-train" / "stage1_train"
COCO_FIXTURE = SHARED_DATA / "coco-eval-fixture"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared data folder, present in CI; absent in a user's clone)")
    return path


@pytest.fixture
def dsb_dir() -> Path:
    """DSB2018 stage1_train in mask-folders layout (../shared)."""
    return _need(DSB_DIR)


@pytest.fixture
def coco_fixture() -> Path:
    """cocoapi's val2014 100-image fixture with reference stats (../shared)."""
    return _need(COCO_FIXTURE)


def make_mask_folder_dataset(root: Path, n_images: int = 3, size: tuple[int, int] = (48, 64),
                             seed: int = 0) -> Path:
    """Write a tiny DSB2018-layout dataset: ``<id>/images/<id>.png`` + ``<id>/masks/*.png``.

    Image i has i+2 non-overlapping rectangular "nuclei" brighter than the background.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n_images):
        sid = f"img{i:03d}"
        (root / sid / "images").mkdir(parents=True)
        (root / sid / "masks").mkdir(parents=True)
        img = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
        for k in range(i + 2):
            m = np.zeros((h, w), np.uint8)
            y0, x0 = 4 + 10 * k % (h - 12), 4 + 14 * k % (w - 12)
            m[y0:y0 + 8, x0:x0 + 10] = 255
            img[m > 0] = 200
            Image.fromarray(m).save(root / sid / "masks" / f"m{k}.png")
        rgba = np.dstack([img, np.full((h, w), 255, np.uint8)])
        Image.fromarray(rgba, "RGBA").save(root / sid / "images" / f"{sid}.png")
    return root


@pytest.fixture
def tiny_mask_folders(tmp_path: Path) -> Path:
    return make_mask_folder_dataset(tmp_path / "tiny")


@pytest.fixture
def onnx_matches_torch():
    """``check(model, path, trace_shape, shapes)``: see :func:`_onnx_matches_torch`."""
    return _onnx_matches_torch


def _onnx_matches_torch(model, path: Path, trace_shape: tuple, shapes: list[tuple], atol: float = 1e-4) -> None:
    """Export ``model``'s (logits, masks) heads traced at ``trace_shape`` with dynamic batch/size,
    then check onnxruntime equals torch on every input shape in ``shapes``."""
    import torch

    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Heads(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            o = self.m(x)
            return o["pred_logits"], o["pred_masks"]

    torch.onnx.export(Heads(model), (torch.rand(*trace_shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["logits", "masks"],
                      dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in shapes:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = Heads(model)(x)
        for got, want in zip(sess.run(None, {"images": x.numpy()}), ref):
            assert got.shape == tuple(want.shape)
            assert (torch.from_numpy(got) - want).abs().max() < atol
