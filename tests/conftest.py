"""Shared fixtures. Tests run offline, on CPU, in seconds; data from ../shared skips cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: one worker per core, so one thread per worker
    os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses tests start, too
    import torch

    torch.set_num_threads(1)

# Tests read castseg's messages on stderr (capsys) also where they call library functions directly,
# so they run with the CLI's handler, as the scripts in benchmarks/ and tools/ do. The library's own
# default (a NullHandler only) is checked in a fresh interpreter: tests/test_console.py.
from castseg import console  # noqa: E402

console.install()

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


# --- a whole CAST run in seconds: 9 embedded DSB images, tiny presets ---------------------------

TRAIN = {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "ckpt_every": 2, "log_every": 1, "device": "cpu"}


@pytest.fixture
def tiny_run(tmp_path):
    """A 9-image split of the embedded default, a tiny random teacher checkpoint and ``tiny.yaml``
    (a `castseg run` config over them) in ``tmp_path``."""
    import json

    import yaml

    from castseg.demo import embedded_default
    from castseg.data.coco_io import load_coco
    from castseg.data.split import make_split, write_split
    from castseg.models import StudentConfig, build_student, save_checkpoint

    coco = load_coco(embedded_default())
    small = coco.to_dict()
    keep = {img["id"] for img in coco.images[:9]}
    small["images"] = [i for i in small["images"] if i["id"] in keep]
    small["annotations"] = [a for a in small["annotations"] if a["image_id"] in keep]
    small["images_root"] = str(coco.images_root)
    (tmp_path / "nine.json").write_text(json.dumps(small))
    sub = load_coco(tmp_path / "nine.json")
    split = make_split(sub, seed=0, labeled_fraction=0.4, val_fraction=0.25)
    files = write_split(sub, split, tmp_path / "splits", 0, 0.4, 0.25)
    import torch

    torch.manual_seed(0)  # the same teacher in every test process: its pseudo-labels drive the losses tests pin
    teacher = build_student(StudentConfig.from_preset("tiny", num_queries=20))
    save_checkpoint(tmp_path / "teacher", teacher, teacher.config.to_dict(), ["nucleus"], step=0)
    cfg = {
        "data": {"labeled": str(files["labeled"]), "unlabeled": str(files["unlabeled"]), "val": str(files["val"]),
                 "crop_size": [96, 96], "scale_range": [0.5, 1.0], "val_max_size": 128},
        "model": {"preset": "tiny", "num_queries": 20, "dec_layers": 2},
        "teacher": {"type": "checkpoint", "path": str(tmp_path / "teacher")},
        "train": TRAIN,
        "loss": {"num_points": 256, "max_anchors": 64, "num_negatives": 16},
        "eval": {"max_dets": 100, "topk": 20, "max_size": 128},
        "pseudo_labels": {"max_size": 128},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path
