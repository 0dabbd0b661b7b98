"""``castseg convert yolo-seg``: Ultralytics polygons → COCO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _convert_helpers import assert_user_error, load, run_cli, save_png, tree_hashes

from castseg.api import data as api
from castseg.data.coco_io import load_coco
from castseg.data.convert import convert

W, H = 40, 20
TRIANGLE = "0 0.1 0.1 0.6 0.1 0.1 0.9"          # pixels (4,2) (24,2) (4,18): area 160
SQUARE = "1 0.5 0.5 0.9 0.5 0.9 0.9 0.5 0.9"    # pixels (20,10)-(36,18): area 128


def _shoelace(poly: list[float]) -> float:
    x, y = np.array(poly[0::2]), np.array(poly[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def _dataset(root: Path, names: str = "names:\n  0: cell\n  1: debris\n", yaml_name: str = "data.yaml") -> Path:
    save_png(root / "images" / "train" / "a.png", np.full((H, W, 3), 50, np.uint8))
    save_png(root / "images" / "val" / "b.png", np.full((H, W), 50, np.uint8))  # grayscale
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(f"{TRIANGLE}\n\n{SQUARE}\n")
    (root / "labels" / "val" / "b.txt").write_text(f"{SQUARE}\n")
    (root / yaml_name).write_text(f"path: .\ntrain: images/train\nval: images/val\n{names}")
    return root


def test_yolo_seg_converts(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ds")
    before = tree_hashes(src)
    out = tmp_path / "ann.json"
    rc, stdout, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", out)
    assert rc == 0, err
    assert "2 images, 3 annotations, 2 categories" in err
    assert tree_hashes(src) == before
    data = load(out)
    assert [i["file_name"] for i in data["images"]] == ["images/train/a.png", "images/val/b.png"]
    assert data["categories"] == [{"id": 1, "name": "cell", "supercategory": ""},
                                  {"id": 2, "name": "debris", "supercategory": ""}]
    tri, sq, sq2 = data["annotations"]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3]
    assert (tri["category_id"], sq["category_id"], sq2["image_id"]) == (1, 2, 2)
    assert tri["segmentation"] == [[4.0, 2.0, 24.0, 2.0, 4.0, 18.0]]  # polygons in pixels
    for a in (tri, sq):
        exact = _shoelace(a["segmentation"][0])
        assert abs(a["area"] - exact) <= 0.15 * exact, (a["area"], exact)
    assert sq["bbox"][0] == pytest.approx(20, abs=1) and sq["bbox"][2] == pytest.approx(16, abs=1)
    load_coco(out)


def test_yolo_seg_split_and_names_list(tmp_path: Path):
    src = _dataset(tmp_path / "ds", names="names: [cell, debris]\n", yaml_name="cells.yaml")
    data = convert("yolo-seg", src, split="train")
    assert [i["file_name"] for i in data["images"]] == ["images/train/a.png"]
    assert [c["name"] for c in data["categories"]] == ["cell", "debris"]
    assert len(data["annotations"]) == 2


def test_yolo_seg_image_without_label_is_background(tmp_path: Path):
    src = _dataset(tmp_path / "ds")
    (src / "labels" / "val" / "b.txt").unlink()
    data = convert("yolo-seg", src)
    assert len(data["images"]) == 2 and {a["image_id"] for a in data["annotations"]} == {1}


def test_yolo_seg_names_option(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ds")
    (src / "data.yaml").unlink()
    (tmp_path / "classes.yaml").write_text("names: {0: a, 1: b}\n")
    rc, _, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "--names")
    out = api.convert("yolo-seg", src, out=tmp_path / "o.json", names=tmp_path / "classes.yaml")
    assert [c["name"] for c in load(out)["categories"]] == ["a", "b"]
    capsys.readouterr()  # its summary line
    rc, _, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", tmp_path / "classes.yaml",
                         "--names", tmp_path / "classes.yaml")
    assert_user_error(rc, err, "classes.yaml", "input")


@pytest.mark.parametrize("line, message", [
    ("0 0.1 0.1 0.6 0.1 0.1", "odd number of coordinates"),
    ("5 0.1 0.1 0.6 0.1 0.1 0.9", "class index 5 is not in names"),
    ("0 0.5 0.5 0.2 0.2", "detection box"),
    ("0 4 2 24 2 4 18", "normalised to [0, 1]"),
    ("cell 0.1 0.1 0.6 0.1 0.1 0.9", "integer class"),
    ("0 0.1 0.1 0.1 0.1 0.1 0.1", "zero area"),
])
def test_yolo_seg_bad_label_line(tmp_path: Path, capsys, line: str, message: str):
    src = _dataset(tmp_path / "ds")
    (src / "labels" / "train" / "a.txt").write_text(f"{TRIANGLE}\n{line}\n")
    rc, _, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "a.txt", "line 2", message)


def test_yolo_seg_bad_yaml(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ds", names="nc: 2\n")
    rc, _, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "data.yaml", "names")
    (src / "data.yaml").write_text("names: [a\n")
    rc, _, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "data.yaml", "YAML")


def test_yolo_seg_corrupt_image(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ds")
    (src / "images" / "val" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    rc, _, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "b.png")


def test_yolo_seg_labels_not_mirroring_images(tmp_path: Path, capsys):
    src = _dataset(tmp_path / "ds")
    for p in (src / "labels").rglob("*.txt"):
        p.rename(p.with_name("x_" + p.name))
    rc, _, err = run_cli(capsys, "convert", "yolo-seg", src, "--out", tmp_path / "o.json")
    assert_user_error(rc, err, "labels", "mirror")
