"""`castseg predict` and `castseg bench` on the embedded default images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from castseg import cli
from castseg.demo import embedded_default
from castseg.data.coco_io import load_coco
from castseg.models import build_student, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "student"
    model = build_student("tiny")
    save_checkpoint(path, model, model.config.to_dict(), ["nucleus"], step=0)
    return path


@pytest.fixture
def three_images(tmp_path):
    coco = load_coco(embedded_default())
    folder = tmp_path / "imgs"
    folder.mkdir()
    for img in coco.images[:3]:
        shutil.copy(coco.image_path(img), folder / img["file_name"].split("/")[-1])
    (folder / "notes.txt").write_text("not an image")  # skipped with a warning
    return folder


def test_predict_writes_results_overlays_and_label_maps(checkpoint, three_images, tmp_path, capsys):
    out = tmp_path / "pred"
    with pytest.warns(UserWarning, match="skipped 1 non-image"):
        code = cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(three_images), "--out", str(out),
                         "--score-threshold", "0", "--max-instances", "7", "--label-maps"])
    assert code == 0
    records = json.loads((out / "predictions.json").read_text())
    assert len(records) == 3 * 7 and {r["image_id"] for r in records} == {1, 2, 3}
    for src in sorted(three_images.glob("*.png")):
        size = Image.open(src).size
        overlay = Image.open(out / "overlays" / src.name)
        overlay.verify()
        assert Image.open(out / "overlays" / src.name).size == size
        labels = np.asarray(Image.open(out / "labels" / src.name))
        assert labels.shape == size[::-1] and labels.max() <= 7
    # the results file is what `castseg eval` reads: evaluate it against a GT of those images
    gt = {"images": [{"id": i + 1, "file_name": p.name, "height": Image.open(p).size[1], "width": Image.open(p).size[0]}
                     for i, p in enumerate(sorted(three_images.glob("*.png")))],
          "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    capsys.readouterr()
    assert cli.main(["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(out / "predictions.json"), "--json"]) == 0
    assert "AP" in json.loads(capsys.readouterr().out)


def test_predict_on_a_coco_json_uses_its_ids(checkpoint, tmp_path):
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(embedded_default()), "--out", str(out),
                     "--score-threshold", "0", "--max-instances", "1", "--max-size", "64", "--no-overlays"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    coco = load_coco(embedded_default())
    assert {r["image_id"] for r in records} == {img["id"] for img in coco.images}
    assert all(r["segmentation"]["size"] == [256, 320] for r in records)  # masks at the original size


def test_predict_bad_inputs_fail_with_one_line(checkpoint, tmp_path, capsys):
    code = cli.main(["predict", "--checkpoint", str(tmp_path / "nope"), "--images", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "nope: not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.png").write_bytes(b"garbage")
    code = cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "bad.png"),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.png" in err and "Traceback" not in err


def test_predict_on_a_coco_json_without_the_models_class_fails_with_one_line(checkpoint, tmp_path, capsys):
    data = json.loads(embedded_default().read_text())
    data["categories"] = [{"id": 1, "name": "cell"}]  # the model predicts "nucleus"
    data["images_root"] = str(embedded_default().parent)
    (tmp_path / "other.json").write_text(json.dumps(data))
    code = cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "other.json"),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "other.json" in err and "no category for the model's classes ['nucleus']" in err
    assert not (tmp_path / "o" / "predictions.json").exists()


def test_bench_json_has_median_per_runtime(checkpoint, capsys):
    assert cli.main(["bench", "--checkpoint", str(checkpoint), "--size", "64x64", "--repeats", "2", "--no-compile",
                     "--teacher", str(checkpoint), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["median_ms"]) == {"student/torch", "teacher/torch"}
    assert all(v > 0 for v in result["median_ms"].values()) and result["teacher_over_student"] > 0


def test_predict_with_a_zero_shot_teacher_folder(three_images, tmp_path):
    from castseg.models.tiny_teacher import save_tiny_grounded_sam

    folder = save_tiny_grounded_sam(tmp_path / "teacher", ["nucleus"], box_threshold=0.0, text_threshold=0.0)
    out = tmp_path / "pred"
    with pytest.warns(UserWarning, match="non-image"):
        code = cli.main(["predict", "--checkpoint", str(folder), "--images", str(three_images), "--out", str(out),
                         "--score-threshold", "0", "--max-size", "96", "--max-instances", "5"])
    assert code == 0
    records = json.loads((out / "predictions.json").read_text())
    assert records and all(r["segmentation"]["size"] == [256, 320] for r in records)
    assert len(list((out / "overlays").glob("*.png"))) == 3
