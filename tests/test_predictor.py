"""`castseg.load(path).predict(images)`: one model object for a student checkpoint, a teacher
folder and an ONNX file; images as users hold them; masks at the input's size."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from PIL import Image

import castseg
from castseg.errors import CastsegError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny student checkpoint, its ONNX export and a tiny zero-shot grounded-SAM folder."""
    from castseg.models import build_student, save_checkpoint
    from castseg.models.tiny_teacher import save_tiny_grounded_sam

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    student = build_student({"preset": "tiny", "num_queries": 10, "dec_layers": 1})
    save_checkpoint(root / "student", student, student.config.to_dict(), ["nucleus"], step=3)
    onnx_path = castseg.load(root / "student", device="cpu").export(root / "student.onnx", height=64, width=64)
    teacher = save_tiny_grounded_sam(root / "teacher", ["nucleus"], box_threshold=0.0, text_threshold=0.0)
    return {"student": root / "student", "onnx": onnx_path, "teacher": teacher}


INPUTS = {
    "grayscale uint8": lambda: np.random.default_rng(0).integers(0, 255, (45, 70), dtype=np.uint8),
    "RGBA uint8": lambda: np.random.default_rng(1).integers(0, 255, (45, 70, 4), dtype=np.uint8),
    "16-bit": lambda: np.random.default_rng(2).integers(0, 4095, (45, 70), dtype=np.uint16),
    "RGB PIL": lambda: Image.fromarray(np.random.default_rng(3).integers(0, 255, (45, 70, 3), dtype=np.uint8)),
}


@pytest.mark.parametrize("kind", ["student", "onnx", "teacher"])
def test_every_model_predicts_on_every_input_with_masks_at_the_input_size(models, kind):
    model = castseg.load(models[kind], device="cpu")
    assert model.kind == kind and model.class_names == ["nucleus"]
    images = [make() for make in INPUTS.values()]
    # 32: the model sees a resized image; the masks still come back at 45x70 (the composite teacher,
    # slow on a CPU, only there)
    for max_size in (None, 32) if kind != "teacher" else (32,):
        results = model.predict(images, max_size=max_size, max_instances=5)
        assert len(results) == len(images)
        for r in results:
            assert r.masks.dtype == bool and r.masks.shape[1:] == (45, 70) and len(r.masks) == len(r) <= 5
            assert r.scores.dtype == np.float32 and r.labels.dtype == np.int64 and r.image is None
            assert np.all(np.diff(r.scores) <= 0)  # best first
    if kind == "teacher":
        return
    # Both ways to hand over the same 16-bit picture agree.
    gray = INPUTS["16-bit"]()
    a, b = model.predict([gray, gray[..., None]], max_size=32)
    assert np.array_equal(a.masks, b.masks) and np.allclose(a.scores, b.scores)


def test_files_folders_and_thresholds(models, tmp_path):
    Image.fromarray(np.full((40, 52), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((30, 30, 4), 200, np.uint8)).save(tmp_path / "b.png")
    model = castseg.load(models["student"], device="cpu")
    from_folder = model.predict(tmp_path, score_threshold=0.0)
    assert [r.image for r in from_folder] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [r.masks.shape[1:] for r in from_folder] == [(40, 52), (30, 30)]
    kept = model.predict(tmp_path / "a.png", score_threshold=float(from_folder[0].scores[2]))[0]
    assert len(kept) == 3 and np.allclose(kept.scores, from_folder[0].scores[:3])
    records = kept.to_coco(image_id=7)
    assert [r["image_id"] for r in records] == [7] * 3 and {r["category_id"] for r in records} == {1}
    assert records[0]["segmentation"]["size"] == [40, 52]


def test_onnx_predicts_like_the_checkpoint(models):
    image = INPUTS["RGB PIL"]()
    [t], [o] = (castseg.load(models[k], device="cpu").predict(image) for k in ("student", "onnx"))
    assert np.allclose(t.scores, o.scores, atol=1e-4) and (t.masks != o.masks).mean() < 1e-3


def test_bad_inputs_are_one_clear_error(models, tmp_path):
    model = castseg.load(models["student"], device="cpu")
    with pytest.raises(CastsegError, match=r"image 0: unsupported image layout with shape \(4, 5, 2\)"):
        model.predict(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(CastsegError, match="expected a path, a folder, a PIL image or a numpy array"):
        model.predict([3.5])
    with pytest.raises(CastsegError, match="only a student checkpoint exports to ONNX"):
        castseg.load(models["onnx"]).export(tmp_path / "again.onnx")
    with pytest.raises(CastsegError, match="not found"):
        castseg.load(tmp_path / "missing")


def test_info_describes_the_model(models):
    info = castseg.load(models["student"], device="cpu").info()
    assert info["kind"] == "student" and info["step"] == 3 and info["params"] > 0
    assert castseg.load(models["onnx"]).info()["params"] is None


def test_the_docstring_examples_run(models, tmp_path, monkeypatch):
    import shutil

    import castseg.predictor

    shutil.copytree(models["student"], tmp_path / "student")
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(castseg.predictor, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0
