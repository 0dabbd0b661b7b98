"""``castseg convert coco``: validation and normalisation of an existing COCO json."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _convert_helpers import assert_user_error, load, run_cli, save_png, tree_hashes, truncate

from castseg.api import data as api
from castseg.data import masks as M


def _dataset(root: Path) -> dict[str, Any]:
    """Two 20x30 images and three annotations: a polygon, an uncompressed and a compressed RLE
    (with deliberately wrong area/bbox, which conversion recomputes)."""
    save_png(root / "imgs" / "a.png", np.full((20, 30, 3), 90, np.uint8))
    save_png(root / "imgs" / "b.png", np.full((20, 30), 40, np.uint8))
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 2:6] = 1
    rle = M.encode(m)
    uncompressed = {"size": [20, 30], "counts": [50, 5] + [15, 5] * 3 + [15, 5] + [600 - 50 - 25 - 60]}
    return {
        "info": {"description": "hand-made"},
        "licenses": [{"id": 1, "name": "CC0"}],
        "images": [{"id": 7, "file_name": "imgs/a.png", "width": 30, "height": 20},
                   {"id": 9, "file_name": "imgs/b.png", "width": 30, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]],
             "area": 999, "bbox": [0, 0, 1, 1], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "segmentation": uncompressed, "area": 1, "bbox": [0, 0, 1, 1],
             "iscrowd": 1},
            {"id": 5, "image_id": 9, "category_id": 4, "segmentation": rle, "area": 20, "bbox": [2, 5, 4, 5]},
        ],
        "categories": [{"id": 3, "name": "cell"}, {"id": 4, "name": "debris", "supercategory": "junk"}],
    }


def _write(root: Path, data: Any, name: str = "ann.json") -> Path:
    path = root / name
    path.write_text(json.dumps(data))
    return path


def test_coco_normalises(tmp_path: Path, capsys):
    src = _write(tmp_path, _dataset(tmp_path))
    before = tree_hashes(tmp_path)
    out = tmp_path / "out" / "norm.json"
    rc, stdout, err = run_cli(capsys, "convert", "coco", src, "--out", out)
    assert rc == 0, err
    assert "2 images, 3 annotations, 2 categories" in err
    assert tree_hashes(tmp_path) == {**before, "out/norm.json": tree_hashes(tmp_path)["out/norm.json"]}
    data = load(out)
    assert data["images_root"] == ".."
    assert data["info"]["description"] == "hand-made" and data["licenses"] == [{"id": 1, "name": "CC0"}]
    assert [img["id"] for img in data["images"]] == [7, 9]  # ids kept: predictions refer to them
    poly, unc, rle = data["annotations"]
    assert poly["segmentation"] == [[2, 2, 12, 2, 12, 8, 2, 8]]  # polygons stay polygons
    assert 50 <= poly["area"] <= 80 and poly["area"] != 999
    assert isinstance(unc["segmentation"]["counts"], str) and unc["iscrowd"] == 1
    assert unc["area"] == 25.0
    assert rle["area"] == 20.0 and rle["bbox"] == [2.0, 5.0, 4.0, 5.0] and rle["iscrowd"] == 0


def test_coco_round_trip_is_identical(tiny_mask_folders: Path, tmp_path: Path):
    first = api.convert("mask-folders", tiny_mask_folders, out=tmp_path / "first.json")
    second = api.convert("coco", first, out=tmp_path / "second.json")
    a, b = load(first), load(second)
    assert a["annotations"] == b["annotations"]
    assert a["images"] == b["images"] and a["categories"] == b["categories"]
    assert a["images_root"] == b["images_root"]


def test_coco_images_root_option(tmp_path: Path, capsys):
    data = _dataset(tmp_path / "pixels")
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    src = _write(ann_dir, data)
    rc, _, err = run_cli(capsys, "convert", "coco", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "a.png", "not found")
    out = api.convert("coco", src, out=tmp_path / "o.json", images_root=tmp_path / "pixels")
    assert load(out)["images_root"] == "pixels"


def _mutate(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """A function returning a copy of the dataset edited in place by ``fn``."""
    def apply(data: dict[str, Any]) -> Any:
        data = copy.deepcopy(data)
        fn(data)
        return data
    return apply


BAD_JSON = {
    "top-level list": (lambda d: [d], "not a COCO instances file"),
    "no images": (_mutate(lambda d: d.pop("images")), "missing top-level key 'images'"),
    "no segmentation": (_mutate(lambda d: d["annotations"][0].pop("segmentation")), "missing key 'segmentation'"),
    "2-point polygon": (_mutate(lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]])), "at least 3"),
    "RLE wrong size": (_mutate(lambda d: d["annotations"][2]["segmentation"].update(size=[10, 30])),
                       "does not match the image size"),
    "unknown image": (_mutate(lambda d: d["annotations"][1].update(image_id=8)), "image_id 8 is not in 'images'"),
    "unknown category": (_mutate(lambda d: d["annotations"][1].update(category_id=5)),
                         "category_id 5 is not in 'categories'"),
    "duplicate image id": (_mutate(lambda d: d["images"][1].update(id=7)), "duplicate image id 7"),
    "duplicate annotation id": (_mutate(lambda d: d["annotations"][2].update(id=1)), "duplicate annotation id 1"),
    "zero-area polygon": (_mutate(lambda d: d["annotations"][0].update(segmentation=[[3, 3, 3, 3, 3, 3]])),
                          "empty mask"),
    "escaping file name": (_mutate(lambda d: d["images"][0].update(file_name="../x.png")), "escapes the images root"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_coco_bad_json(tmp_path: Path, capsys, case: str):
    mutate, message = BAD_JSON[case]
    src = _write(tmp_path, mutate(_dataset(tmp_path)), "bad_input.json")
    rc, _, err = run_cli(capsys, "convert", "coco", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "bad_input.json", message)


def test_coco_not_json(tmp_path: Path, capsys):
    src = tmp_path / "garbage.json"
    src.write_bytes(os.urandom(64))
    rc, _, err = run_cli(capsys, "convert", "coco", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "garbage.json")


@pytest.mark.parametrize("damage", ["random", "truncate"])
def test_coco_corrupt_image(tmp_path: Path, capsys, damage: str):
    src = _write(tmp_path, _dataset(tmp_path))
    img = tmp_path / "imgs" / "b.png"
    img.write_bytes(os.urandom(200)) if damage == "random" else truncate(img)
    rc, _, err = run_cli(capsys, "convert", "coco", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "b.png")


def test_coco_image_size_differs_from_json(tmp_path: Path, capsys):
    src = _write(tmp_path, _dataset(tmp_path))
    save_png(tmp_path / "imgs" / "a.png", np.zeros((21, 30, 3), np.uint8))
    rc, _, err = run_cli(capsys, "convert", "coco", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "a.png", "30x21", "30x20")


def test_coco_refuses_to_overwrite_its_input(tmp_path: Path, capsys):
    src = _write(tmp_path, _dataset(tmp_path))
    before = src.read_bytes()
    rc, _, err = run_cli(capsys, "convert", "coco", src, "--out", src)
    assert_user_error(rc, err, "ann.json", "input")
    assert src.read_bytes() == before
