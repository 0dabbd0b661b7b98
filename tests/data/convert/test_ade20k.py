"""``castseg convert ade20k``: annotations_instance PNGs (R = category, G = instance) → COCO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _convert_helpers import assert_user_error, load, run_cli, save_png, tree_hashes
from PIL import Image

from castseg.data.coco_io import load_coco
from castseg.data.convert import convert

H, W = 12, 20


def _sample(base: Path, split: str, stem: str, ann: np.ndarray) -> None:
    img_path = base / "images" / split / f"{stem}.jpg"
    img_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(img_path, quality=90)
    save_png(base / "annotations_instance" / split / f"{stem}.png", ann)


def _ann(*instances: tuple[int, int, slice, slice]) -> np.ndarray:
    """RGB instance PNG content; each instance is (category, instance id, rows, cols)."""
    a = np.zeros((H, W, 3), np.uint8)
    for cat, inst, rows, cols in instances:
        a[rows, cols, 0], a[rows, cols, 1] = cat, inst
    return a


def _dataset(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    _sample(base, "training", "ADE_train_00000002", _ann((4, 2, slice(0, 4), slice(0, 5)),    # person, 20 px
                                                         (1, 1, slice(5, 12), slice(0, 10)),  # bed, 70 px
                                                         (100, 3, slice(0, 2), slice(15, 20))))  # flag
    _sample(base, "training", "ADE_train_00000001", _ann((9, 1, slice(2, 4), slice(2, 4))))   # car
    _sample(base, "validation", "ADE_val_00000001", _ann())  # nothing annotated
    return root


def test_ade20k_builtin_categories(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ade")
    before = tree_hashes(src)
    out = tmp_path / "ade_train.json"
    rc, stdout, err = run_cli(capsys, "convert", "ade20k", src, "--out", out)
    assert rc == 0, err
    assert "2 images, 4 annotations, 100 categories" in err
    assert tree_hashes(src) == before
    data = load(out)
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert sorted(names) == list(range(1, 101))
    assert (names[1], names[4], names[9], names[26], names[100]) == ("bed", "person", "car", "chest of drawers", "flag")
    assert [i["file_name"] for i in data["images"]] == [
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg",
        "ADEChallengeData2016/images/training/ADE_train_00000002.jpg"]
    got = [(a["image_id"], a["category_id"], a["area"]) for a in data["annotations"]]
    assert got == [(1, 9, 4.0), (2, 1, 70.0), (2, 4, 20.0), (2, 100, 10.0)]  # by instance id (G)
    assert data["annotations"][2]["bbox"] == [0.0, 0.0, 5.0, 4.0]
    load_coco(out)


def test_ade20k_categories_json_and_split_alias(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ade")
    cats = {"images": [], "categories": [{"id": 1, "name": "bed"}, {"id": 4, "name": "person"},
                                         {"id": 9, "name": "car"}, {"id": 100, "name": "flag"}]}
    (src / "ADEChallengeData2016" / "ade20k_instance_imgCatIds.json").write_text(json.dumps(cats))
    data = convert("ade20k", src)
    assert [c["id"] for c in data["categories"]] == [1, 4, 9, 100]
    val = convert("ade20k", src / "ADEChallengeData2016", split="val")
    assert len(val["images"]) == 1 and val["annotations"] == []
    assert val["images"][0]["file_name"] == "images/validation/ADE_val_00000001.jpg"


def test_ade20k_category_not_in_json(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ade")
    (src / "ade20k_instance_imgCatIds.json").write_text(json.dumps({"categories": [{"id": 4, "name": "person"}]}))
    rc, _, err = run_cli(capsys, "convert", "ade20k", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "ADE_train_00000001.png", "category 9")


def test_ade20k_bad_categories_json(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ade")
    (src / "ade20k_instance_imgCatIds.json").write_text(json.dumps({"categories": [{"id": "4"}]}))
    rc, _, err = run_cli(capsys, "convert", "ade20k", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "ade20k_instance_imgCatIds.json", "category #0")


@pytest.mark.parametrize("problem", ["two categories", "grayscale", "size", "missing"])
def test_ade20k_bad_instance_png(tmp_path: Path, capsys, problem: str):
    src = _dataset(tmp_path / "ade")
    png = src / "ADEChallengeData2016/annotations_instance/training/ADE_train_00000001.png"
    if problem == "two categories":
        save_png(png, _ann((9, 1, slice(2, 4), slice(2, 4)), (4, 1, slice(6, 8), slice(2, 4))))
        message = "spans several categories [4, 9]"
    elif problem == "grayscale":
        save_png(png, np.zeros((H, W), np.uint8))
        message = "RGB"
    elif problem == "size":
        save_png(png, np.zeros((H + 2, W, 3), np.uint8))
        message = "differs"
    else:
        png.unlink()
        png = png.parents[3] / "images/training/ADE_train_00000001.jpg"
        message = "no instance annotation"
    rc, _, err = run_cli(capsys, "convert", "ade20k", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, png.name, message)
