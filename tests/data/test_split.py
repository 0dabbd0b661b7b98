"""`castseg split` (:func:`castseg.api.data.split`): reproducible, nested label-fraction splits with
a fixed val set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from castseg.api.data import split
from castseg.data import masks as M
from castseg.data.coco_io import load_coco
from castseg.data.split import count_for, make_split
from castseg.errors import InputError


def make_coco(root: Path, n: int = 20, names: list[str] | None = None) -> Path:
    """``root/data/ann.json`` with images under ``root/data/imgs``; image i has i % 3 objects."""
    data = root / "data"
    (data / "imgs").mkdir(parents=True)
    names = names or [f"imgs/im{i:03d}.png" for i in range(n)]
    images, anns = [], []
    for i, name in enumerate(names):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 10, 3), i, np.uint8)).save(data / name)
        images.append({"id": 100 + i, "file_name": name, "width": 10, "height": 8})
        for k in range(i % 3):
            m = np.zeros((8, 10), np.uint8)
            m[k * 2:k * 2 + 2, 1:5] = 1
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 7, "segmentation": M.encode(m),
                         "iscrowd": 0})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "cell"}]}
    (data / "ann.json").write_text(json.dumps(coco))
    return data / "ann.json"




def read(path: Path):
    return json.loads(path.read_text())


def test_split_writes_labeled_unlabeled_and_resolvable_paths(tmp_path, capsys):
    ann = make_coco(tmp_path)
    out = tmp_path / "splits" / "p25"
    files = split(ann, labeled_fraction=0.25, seed=0, out_dir=out)
    assert files == {k: out / f"{k}.json" for k in ("labeled", "unlabeled", "unlabeled_gt", "split")}
    assert "labeled 5" in capsys.readouterr().err  # a message (logging, stderr), not a result
    lab, unl = read(out / "labeled.json"), read(out / "unlabeled.json")
    assert len(lab["images"]) == 5 and len(unl["images"]) == 15
    assert "annotations" not in unl  # documented: no key at all, not an empty list
    lab_ids = {im["id"] for im in lab["images"]}
    assert {a["image_id"] for a in lab["annotations"]} <= lab_ids
    assert len(lab["annotations"]) == sum(((i - 100) % 3) for i in lab_ids)
    assert not (out / "val.json").exists()
    # file names are kept; the images_root key makes them resolve from the output folder.
    assert lab["images_root"] == "../../data"
    coco = load_coco(out / "labeled.json")
    assert all(coco.image_path(im).exists() for im in coco.images)
    unl_coco = load_coco(out / "unlabeled.json", require_annotations=False)
    assert all(unl_coco.image_path(im).exists() for im in unl_coco.images)
    with pytest.raises(InputError, match="annotations"):
        load_coco(out / "unlabeled.json")


def test_same_seed_gives_byte_identical_outputs(tmp_path):
    ann = make_coco(tmp_path)
    for d in ("a", "b"):
        split(ann, labeled_fraction=0.3, val_fraction=0.2, out_dir=tmp_path / d)
    for name in ("labeled.json", "unlabeled.json", "val.json", "split.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    split(ann, labeled_fraction=0.3, val_fraction=0.2, seed=1, out_dir=tmp_path / "c")
    assert read(tmp_path / "c" / "split.json")["image_ids"] != read(tmp_path / "a" / "split.json")["image_ids"]


def test_growing_fractions_are_nested_and_share_val(tmp_path):
    ann = make_coco(tmp_path, n=60)
    ids = {}
    for f in ("0.05", "0.1", "0.3", "1.0"):
        split(ann, labeled_fraction=float(f), val_fraction=0.15, seed=3, out_dir=tmp_path / f)
        ids[f] = read(tmp_path / f / "split.json")["image_ids"]
    vals = [tuple(v["val"]) for v in ids.values()]
    assert len(set(vals)) == 1 and len(vals[0]) == 9
    lab = [set(ids[f]["labeled"]) for f in ("0.05", "0.1", "0.3", "1.0")]
    assert [len(s) for s in lab] == [3, 5, 15, 51]
    assert lab[0] <= lab[1] <= lab[2] <= lab[3]
    for v in ids.values():  # the three parts partition the images
        parts = [set(v["labeled"]), set(v["unlabeled"]), set(v["val"])]
        assert sum(map(len, parts)) == 60 and set().union(*parts) == set(range(100, 160))
    assert ids["1.0"]["unlabeled"] == []
    # eval reads val.json without extra flags
    val = load_coco(tmp_path / "0.1" / "val.json")
    assert len(val.images) == 9 and all(val.image_path(im).exists() for im in val.images)


def test_at_least_one_labeled_image():
    assert count_for(0.001, 20) == 1 and count_for(0.5, 3) == 2 and count_for(1.0, 7) == 7


@pytest.mark.parametrize("kwargs, match", [
    ({"labeled_fraction": 0}, "labeled-fraction"),
    ({"labeled_fraction": 1.5}, "labeled-fraction"),
    ({"labeled_fraction": float("nan")}, "labeled-fraction"),
    ({"labeled_fraction": 0.1, "val_fraction": 1}, "val-fraction"),
    ({"labeled_fraction": 0.1, "val_fraction": -0.1}, "val-fraction"),
])
def test_bad_fractions_are_clear_errors(tmp_path, kwargs, match):
    ann = make_coco(tmp_path, n=4)
    with pytest.raises(InputError, match=match):
        split(ann, **kwargs, out_dir=tmp_path / "o")


def test_val_must_leave_training_images(tmp_path):
    coco = load_coco(make_coco(tmp_path, n=2))
    with pytest.raises(InputError, match="no image to train on"):
        make_split(coco, labeled_fraction=0.5, val_fraction=0.9)


def test_labeled_ids_match_names_stems_and_paths(tmp_path):
    names = [f"city/aachen_{i:06d}_000019_leftImg8bit.png" for i in range(6)]
    ann = make_coco(tmp_path, names=names)
    ids_file = tmp_path / "perc_10.txt"
    ids_file.write_text("\n".join([
        "# Guided-Distillation style list",
        "aachen_000000_000019",                                           # stem prefix (Cityscapes id)
        "leftImg8bit/train/city/aachen_000001_000019_leftImg8bit.png",    # path containing the file name
        "aachen_000002_000019_leftImg8bit",                               # stem
        "",
        "aachen_000003_000019_leftImg8bit.png",                           # base name
        "aachen_000003_000019_leftImg8bit.png",                           # duplicate: ignored
    ]) + "\n")
    out = tmp_path / "o"
    split(ann, labeled_ids=ids_file, val_fraction=0.2, out_dir=out)
    man = read(out / "split.json")
    assert man["image_ids"]["labeled"] == [100, 101, 102, 103]
    assert man["image_ids"]["val"] and set(man["image_ids"]["val"]) <= {104, 105}
    assert man["labeled_fraction"] is None
    assert man["labeled_ids_sha256"] == hashlib.sha256(ids_file.read_bytes()).hexdigest()


def test_unmatched_labeled_ids_are_listed(tmp_path):
    ann = make_coco(tmp_path, n=5)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("im000\nnope_a\nimgs/im001.png\nnope_b\n")
    with pytest.raises(InputError, match=r"2 of 4 entries match no image.*'nope_a', 'nope_b'"):
        split(ann, labeled_ids=ids_file, out_dir=tmp_path / "o")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(InputError, match="no entries"):
        split(ann, labeled_ids=tmp_path / "empty.txt", out_dir=tmp_path / "o")


def test_ambiguous_labeled_id_is_an_error(tmp_path):
    ann = make_coco(tmp_path, names=["a/x.png", "b/x.png", "c/y.png"])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("x.png\n")
    with pytest.raises(InputError, match="several images"):
        split(ann, labeled_ids=ids_file, out_dir=tmp_path / "o")
    ids_file.write_text("/data/a/x.png\n")  # a longer path disambiguates
    split(ann, labeled_ids=ids_file, out_dir=tmp_path / "o")
    assert read(tmp_path / "o" / "split.json")["image_ids"]["labeled"] == [100]


def test_manifest_records_provenance(tmp_path):
    ann = make_coco(tmp_path)
    out = tmp_path / "o"
    split(ann, labeled_fraction=0.1, val_fraction=0.15, seed=5, out_dir=out)
    man = read(out / "split.json")
    assert man["seed"] == 5 and man["labeled_fraction"] == 0.1 and man["val_fraction"] == 0.15
    assert man["source_sha256"] == hashlib.sha256(ann.read_bytes()).hexdigest()
    unlabeled_anns = sum((i - 100) % 3 for i in man["image_ids"]["unlabeled"])  # image i has i % 3 objects
    assert man["counts"] == {"images": 20, "labeled": 2, "unlabeled": 15, "val": 3,
                             "labeled_annotations": man["counts"]["labeled_annotations"],
                             "unlabeled_annotations": unlabeled_anns,
                             "val_annotations": man["counts"]["val_annotations"]}
    assert (out / man["source"]).resolve() == ann.resolve()
    assert sorted(im["id"] for im in read(out / "val.json")["images"]) == man["image_ids"]["val"]


def test_unlabeled_gt_keeps_exactly_the_unlabeled_images_annotations(tmp_path, capsys):
    ann = make_coco(tmp_path)
    out = tmp_path / "o"
    split(ann, labeled_fraction=0.25, val_fraction=0.2, seed=2, out_dir=out)
    gt, unl = load_coco(out / "unlabeled_gt.json"), read(out / "unlabeled.json")
    assert [im["id"] for im in gt.images] == [im["id"] for im in unl["images"]]
    assert gt.images == unl["images"]
    assert gt.images_root == load_coco(out / "unlabeled.json", require_annotations=False).images_root
    ids = {im["id"] for im in gt.images}
    theirs = [a["id"] for a in load_coco(ann).annotations if a["image_id"] in ids]
    assert [a["id"] for a in gt.annotations] == theirs and len(theirs) == sum((i - 100) % 3 for i in ids) > 0
    others = {im["id"] for f in ("labeled.json", "val.json") for im in read(out / f)["images"]}
    assert len(others) == 8 and not others & {a["image_id"] for a in gt.annotations}
    man = read(out / "split.json")
    assert man["files"]["unlabeled_gt"] == "unlabeled_gt.json" and man["counts"]["unlabeled_annotations"] == \
        len(gt.annotations)
    assert "annotations" not in unl  # the training file stays images-only
    # all images labeled: nothing to set aside, and the earlier file is flagged as stale
    capsys.readouterr()
    split(ann, labeled_fraction=1.0, val_fraction=0.2, seed=2, out_dir=out)
    assert "unlabeled_gt" not in read(out / "split.json")["files"]
    assert f"warning: {out / 'unlabeled_gt.json'} is from an earlier run" in capsys.readouterr().err


def test_no_unlabeled_gt_without_annotations_on_the_unlabeled_images(tmp_path):
    from castseg.data.split import write_split

    coco = load_coco(make_coco(tmp_path, n=6))
    # images 100 and 103 have no objects (i % 3 == 0): left unlabeled, there is nothing to set aside
    files = write_split(coco, make_split(coco, labeled_ids=[101, 102, 104, 105]), tmp_path / "o", 0, None, 0.0)
    assert "unlabeled_gt" not in files and not (tmp_path / "o" / "unlabeled_gt.json").exists()
    assert read(tmp_path / "o" / "split.json")["image_ids"]["unlabeled"] == [100, 103]


def test_images_root_flag_and_key(tmp_path):
    ann = make_coco(tmp_path, n=4)
    # Move the json away from its images: --images-root tells split where they are.
    moved = tmp_path / "elsewhere" / "ann.json"
    moved.parent.mkdir()
    moved.write_text(ann.read_text())
    lost = load_coco(moved)
    assert not any(lost.image_path(im).exists() for im in lost.images)
    split(moved, labeled_fraction=0.5, images_root=ann.parent, out_dir=tmp_path / "o")
    coco = load_coco(tmp_path / "o" / "labeled.json")
    assert coco.images_root.resolve() == ann.parent.resolve()
    assert all(coco.image_path(im).exists() for im in coco.images)
    # An explicit images_root argument still wins over the key.
    assert load_coco(tmp_path / "o" / "labeled.json", images_root=tmp_path).images_root == tmp_path
    # Splitting a split re-bases the key on the new output folder.
    split(tmp_path / "o" / "labeled.json", labeled_fraction=0.5, out_dir=tmp_path / "o" / "again")
    again = load_coco(tmp_path / "o" / "again" / "labeled.json")
    assert all(again.image_path(im).exists() for im in again.images)


def test_refuses_to_overwrite_input(tmp_path):
    ann = make_coco(tmp_path, n=4)
    target = ann.parent / "labeled.json"
    target.write_text(ann.read_text())
    with pytest.raises(InputError, match="overwrite the input"):
        split(target, labeled_fraction=0.5, out_dir=ann.parent)


def test_cli_error_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from castseg import cli

    monkeypatch.setattr(cli, "COMMANDS", ["split"])  # independent of the other verbs' progress
    ann = make_coco(tmp_path, n=4)
    assert cli.main(["split", str(ann), "--labeled-fraction", "2", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--labeled-fraction" in err
