"""``castseg convert`` / :func:`castseg.api.data.convert`: CLI behaviour, the mask-folders format,
and the DSB2018 conversion.

Other formats: tests/data/convert/test_{coco,yolo_seg,cityscapes,ade20k}.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _convert_helpers import assert_user_error, load, run_cli, save_png, tree_hashes, truncate

from castseg.api import data as api
from castseg.data import masks as M
from castseg.data.coco_io import load_coco
from castseg.data.convert import convert


def test_mask_folders_converts_tiny_dataset(tiny_mask_folders: Path, tmp_path: Path, capsys):
    before = tree_hashes(tiny_mask_folders)
    out = tmp_path / "out" / "ann.json"
    rc, stdout, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", out)
    assert rc == 0, err
    assert "3 images, 9 annotations, 1 categories" in err and str(out) in err and stdout == ""  # logged
    data = load(out)
    assert list(data)[:2] == ["info", "images_root"]
    assert [img["id"] for img in data["images"]] == [1, 2, 3]
    assert [img["file_name"] for img in data["images"]] == [f"img{i:03d}/images/img{i:03d}.png" for i in range(3)]
    assert all((img["width"], img["height"]) == (64, 48) for img in data["images"])
    assert [a["id"] for a in data["annotations"]] == list(range(1, 10))
    assert [a["image_id"] for a in data["annotations"]] == [1] * 2 + [2] * 3 + [3] * 4
    assert data["categories"] == [{"id": 1, "name": "nucleus", "supercategory": ""}]
    first = data["annotations"][0]
    assert first["area"] == 80.0 and first["bbox"] == [4.0, 4.0, 10.0, 8.0] and first["iscrowd"] == 0
    assert isinstance(first["segmentation"]["counts"], str)
    # Loads back, and file names resolve to the real images from the output's folder.
    coco = load_coco(out)
    assert all(coco.image_path(img).is_file() for img in coco.images)
    assert tree_hashes(tiny_mask_folders) == before


def test_mask_folders_output_is_deterministic(tiny_mask_folders: Path, tmp_path: Path):
    a = api.convert("mask-folders", tiny_mask_folders, out=tmp_path / "a.json")
    b = api.convert("mask-folders", tiny_mask_folders, out=tmp_path / "b.json", workers=1)
    assert a.read_bytes() == b.read_bytes()


def test_mask_folders_masks_match_files(tiny_mask_folders: Path):
    data = convert("mask-folders", tiny_mask_folders, class_name="cell")
    assert data["categories"][0]["name"] == "cell"
    masks = sorted((tiny_mask_folders / "img001" / "masks").glob("*.png"))
    anns = [a for a in data["annotations"] if a["image_id"] == 2]
    from PIL import Image

    for a, mp in zip(anns, masks):
        assert (M.decode(a["segmentation"]) == (np.asarray(Image.open(mp)) > 0)).all()


@pytest.mark.parametrize("kind", ["gray", "gray16", "rgba", "rgb"])
def test_mask_folders_image_modes(tmp_path: Path, kind: str):
    h, w = 20, 30
    rng = np.random.default_rng(1)
    img = {
        "gray": rng.integers(0, 255, (h, w), dtype=np.uint8),
        "gray16": rng.integers(0, 4096, (h, w), dtype=np.uint16),  # a 12-bit camera in 16 bits
        "rgba": rng.integers(0, 255, (h, w, 4), dtype=np.uint8),
        "rgb": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
    }[kind]
    save_png(tmp_path / "ds" / "s1" / "images" / "s1.png", img)
    m = np.zeros((h, w), np.uint8)
    m[3:9, 5:15] = 255
    save_png(tmp_path / "ds" / "s1" / "masks" / "a.png", m)
    data = convert("mask-folders", tmp_path / "ds")
    assert (data["images"][0]["height"], data["images"][0]["width"]) == (h, w)
    assert [a["area"] for a in data["annotations"]] == [60.0]


def test_mask_folders_overlapping_masks_kept(tmp_path: Path):
    save_png(tmp_path / "ds" / "s" / "images" / "s.png", np.zeros((16, 16, 3), np.uint8))
    a, b = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    a[2:10, 2:10], b[6:14, 6:14] = 255, 1  # overlap of 16 px; values other than 255 count too
    save_png(tmp_path / "ds" / "s" / "masks" / "a.png", a)
    save_png(tmp_path / "ds" / "s" / "masks" / "b.png", b)
    data = convert("mask-folders", tmp_path / "ds")
    assert [x["area"] for x in data["annotations"]] == [64.0, 64.0]


def test_mask_folders_sample_without_masks_is_unlabeled(tmp_path: Path):
    save_png(tmp_path / "ds" / "s" / "images" / "s.png", np.zeros((8, 8, 3), np.uint8))
    data = convert("mask-folders", tmp_path / "ds")
    assert len(data["images"]) == 1 and data["annotations"] == []


# ---- bad input: one line on stderr naming the file, exit 2 ------------------------------------

def test_corrupt_image(tiny_mask_folders: Path, tmp_path: Path, capsys):
    bad = tiny_mask_folders / "img001" / "images" / "img001.png"
    bad.write_bytes(os.urandom(300))
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "img001.png")
    assert not (tmp_path / "o.json").exists()


def test_truncated_image_caught_unless_not_verified(tiny_mask_folders: Path, tmp_path: Path, capsys):
    truncate(tiny_mask_folders / "img002" / "images" / "img002.png")
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "img002.png", "truncated")
    # Header-only mode cannot see the damage: that is what verification is for.
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path / "o.json",
                         "--no-verify-images")
    assert rc == 0, err


def test_truncated_mask(tiny_mask_folders: Path, tmp_path: Path, capsys):
    truncate(tiny_mask_folders / "img000" / "masks" / "m1.png")
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "m1.png")


def test_empty_mask(tiny_mask_folders: Path, tmp_path: Path, capsys):
    save_png(tiny_mask_folders / "img001" / "masks" / "m2.png", np.zeros((48, 64), np.uint8))
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "m2.png", "empty mask")


def test_mask_size_differs_from_image(tiny_mask_folders: Path, tmp_path: Path, capsys):
    save_png(tiny_mask_folders / "img001" / "masks" / "m0.png", np.full((40, 64), 255, np.uint8))
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "m0.png", "64x40", "64x48")


def test_sample_without_images_folder(tiny_mask_folders: Path, tmp_path: Path, capsys):
    (tiny_mask_folders / "stray" / "masks").mkdir(parents=True)
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "stray", "images/")


def test_missing_src_and_misplaced_options(tmp_path: Path, capsys):
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tmp_path / "nope", "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "nope", "not found")
    (tmp_path / "ds").mkdir()
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tmp_path / "ds", "--out", tmp_path / "o.json",
                         "--names", "x.yaml")
    assert_user_error(rc, err, "--names", "yolo-seg")


# ---- --out handling ---------------------------------------------------------------------------

def test_out_inside_src_allowed_and_rerunnable(tiny_mask_folders: Path):
    out = api.convert("mask-folders", tiny_mask_folders, out=tiny_mask_folders / "annotations.json")
    data = load(out)
    assert "images_root" not in data  # the json sits in the dataset root: the COCO default
    assert load_coco(out).image_path(data["images"][0]).is_file()
    # Our own earlier output may be replaced; the conversion ignores it as an input.
    before = tree_hashes(tiny_mask_folders)
    assert api.convert("mask-folders", tiny_mask_folders, out=out) == out
    assert tree_hashes(tiny_mask_folders) == before


@pytest.mark.parametrize("victim", ["img000/images/img000.png", "img000/masks/m0.png", "notes.json"])
def test_out_refuses_to_overwrite_inputs(tiny_mask_folders: Path, capsys, victim: str):
    (tiny_mask_folders / "notes.json").write_text('{"mine": 1}')
    before = tree_hashes(tiny_mask_folders)
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tiny_mask_folders / victim)
    assert_user_error(rc, err, Path(victim).name, "castseg convert")
    assert tree_hashes(tiny_mask_folders) == before


def test_out_is_a_folder(tiny_mask_folders: Path, tmp_path: Path, capsys):
    rc, _, err = run_cli(capsys, "convert", "mask-folders", tiny_mask_folders, "--out", tmp_path)
    assert_user_error(rc, err, "folder")


# ---- real data --------------------------------------------------------------------------------

@pytest.mark.slow
def test_dsb2018_full_conversion(dsb_dir: Path, tmp_path: Path, capsys):
    before = {p: p.stat().st_mtime_ns for p in list(dsb_dir.iterdir())[:50]}
    out = tmp_path / "x.json"
    rc, stdout, err = run_cli(capsys, "convert", "mask-folders", dsb_dir, "--out", out)
    assert rc == 0, err
    assert "664 images, 28986 annotations, 1 categories" in err
    coco = load_coco(out)
    assert len(coco.images) == 664 and len(coco.annotations) == 28_986
    for ann in coco.annotations:
        img = coco.image_by_id[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["area"] > 0 and w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
    assert coco.image_path(coco.images[0]).is_file()
    assert {p: p.stat().st_mtime_ns for p in before} == before

