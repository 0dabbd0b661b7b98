"""``castseg convert cityscapes``: *_gtFine_instanceIds.png → COCO with Cityscapes label ids."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from _convert_helpers import assert_user_error, load, run_cli, save_png, tree_hashes

from castseg.data import masks as M
from castseg.data.coco_io import load_coco
from castseg.data.convert import convert

H, W = 16, 32


def _frame(root: Path, city: str, stem: str, ids: np.ndarray, split: str = "train", writer: str = "pil") -> None:
    gt = root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png"
    gt.parent.mkdir(parents=True, exist_ok=True)
    if writer == "pil":
        save_png(gt, ids.astype(np.uint16))
    else:
        cv2.imwrite(str(gt), ids.astype(np.uint16))
    save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.full((H, W, 3), 128, np.uint8))


def _dataset(root: Path) -> Path:
    a = np.full((H, W), 7, np.int32)  # road (not a thing)
    a[0:4, 0:4] = 26000                # car #0: 16 px
    a[0:4, 10:16] = 26001              # car #1: 24 px
    a[8:16, 0:3] = 24000               # person #0: 24 px
    a[10:12, 20:30] = 26               # a group of cars: crowd, 20 px
    a[12:14, 20:25] = 26               # ... same crowd, another blob: 10 px
    a[14:16, 28:32] = 29000            # caravan: has instances but is not evaluated
    _frame(root, "aachen", "aachen_000000_000019", a)
    b = np.zeros((H, W), np.int32)
    b[2:6, 2:6] = 33000                # bicycle
    b[6:8, 6:8] = 25                   # rider crowd
    _frame(root, "bremen", "bremen_000001_000019", b, writer="cv2")
    return root


def test_cityscapes_converts(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "cs")
    before = tree_hashes(src)
    out = tmp_path / "cs_train.json"
    rc, stdout, err = run_cli(capsys, "convert", "cityscapes", src, "--out", out)
    assert rc == 0, err
    assert "2 images, 6 annotations, 8 categories" in err
    assert tree_hashes(src) == before
    data = load(out)
    assert [(c["id"], c["name"]) for c in data["categories"]] == [
        (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"),
        (32, "motorcycle"), (33, "bicycle")]
    assert [i["file_name"] for i in data["images"]] == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png"]
    got = [(a["image_id"], a["category_id"], a["iscrowd"], a["area"]) for a in data["annotations"]]
    # Sorted by pixel value within an image: crowd value 26 comes before instances 24000...
    assert got == [(1, 26, 1, 30.0), (1, 24, 0, 24.0), (1, 26, 0, 16.0), (1, 26, 0, 24.0),
                   (2, 25, 1, 4.0), (2, 33, 0, 16.0)]
    car1 = data["annotations"][3]
    assert car1["bbox"] == [10.0, 0.0, 6.0, 4.0]
    assert M.decode(car1["segmentation"])[0:4, 10:16].all()
    load_coco(out)


def test_cityscapes_split_option(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "cs")
    rc, _, err = run_cli(capsys, "convert", "cityscapes", src, "--out", tmp_path / "o.json", "--split", "val")
    assert_user_error(rc, err, "gtFine/val", "not found")
    rc, _, err = run_cli(capsys, "convert", "cityscapes", src, "--out", tmp_path / "o.json", "--split", "dev")
    assert_user_error(rc, err, "dev", "train")
    _frame(src, "lindau", "lindau_000000_000019", np.full((H, W), 24005), split="val")
    data = convert("cityscapes", src, split="val")
    assert [a["category_id"] for a in data["annotations"]] == [24]


def test_cityscapes_label_size_differs(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "cs")
    save_png(src / "gtFine/train/bremen/bremen_000001_000019_gtFine_instanceIds.png", np.zeros((H, W + 1), np.uint16))
    rc, _, err = run_cli(capsys, "convert", "cityscapes", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "bremen_000001_000019_gtFine_instanceIds.png", "differs")


def test_cityscapes_missing_image(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "cs")
    (src / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png").unlink()
    rc, _, err = run_cli(capsys, "convert", "cityscapes", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "aachen_000000_000019_gtFine_instanceIds.png", "no matching image")


def test_cityscapes_colour_label_rejected(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "cs")
    save_png(src / "gtFine/train/bremen/bremen_000001_000019_gtFine_instanceIds.png", np.zeros((H, W, 3), np.uint8))
    rc, _, err = run_cli(capsys, "convert", "cityscapes", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "bremen_000001_000019_gtFine_instanceIds.png", "single-channel")
