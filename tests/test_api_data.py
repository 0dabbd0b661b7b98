"""castseg.api.data: convert / split / evaluate / pseudo_label as functions (the CLI verbs are thin
wrappers over them: their flags, exit codes and one-line errors are tested with the verbs)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch

from castseg.api import data as api
from castseg.errors import InputError


@pytest.fixture
def cells(tiny_mask_folders: Path, tmp_path: Path, monkeypatch) -> Path:
    """The working directory of the module's examples: ``cells/``, 3 images in the mask-folders
    layout with 2 + 3 + 4 instances (conftest's tiny dataset)."""
    tiny_mask_folders.rename(tmp_path / "cells")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cells"


def test_docstring_examples_run(cells):
    result = doctest.testmod(api, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted >= 20  # every public function has examples
    for fn in (api.convert, api.split, api.evaluate, api.pseudo_label):
        assert "Examples:" in fn.__doc__ and ">>> " in fn.__doc__ and "Returns:" in fn.__doc__


# ---------------------------------------------------------------- convert

def test_convert_is_deterministic_and_threads_do_not_matter(cells, tmp_path):
    a = api.convert("mask-folders", cells, out=tmp_path / "a.json")
    b = api.convert("mask-folders", str(cells), out=str(tmp_path / "b.json"), workers=1)
    assert a == tmp_path / "a.json" and isinstance(b, Path)
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text())["images_root"] == "cells"


def test_convert_out_inside_the_dataset_is_rerunnable_but_never_replaces_other_files(cells, capsys):
    out = api.convert("mask-folders", cells, out=cells / "annotations.json")
    assert "images_root" not in json.loads(out.read_text())  # the dataset root: the COCO default
    assert "3 images, 9 annotations, 1 categories" in capsys.readouterr().err  # the summary is a message
    api.convert("mask-folders", cells, out=out)  # our own earlier output may be replaced
    (cells / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(InputError, match="notes.json.*not written by castseg convert"):
        api.convert("mask-folders", cells, out=cells / "notes.json")
    with pytest.raises(InputError, match="is an input of this conversion"):
        api.convert("coco", out, out=out)
    assert (cells / "notes.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("kwargs, match", [
    ({"names": "x.yaml"}, r"names \(--names\) applies to yolo-seg, not to mask-folders"),
    ({"split": "val"}, r"split \(--split\) applies to yolo-seg, cityscapes, ade20k, not to mask-folders"),
    ({"workers": 0}, r"workers \(--workers\) must be at least 1"),
])
def test_convert_bad_arguments(cells, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        api.convert("mask-folders", cells, out=tmp_path / "o.json", **kwargs)
    with pytest.raises(InputError, match="unknown format 'voc'"):
        api.convert("voc", cells, out=tmp_path / "o.json")
    with pytest.raises(InputError, match="nope: not found"):
        api.convert("mask-folders", tmp_path / "nope", out=tmp_path / "o.json")
    with pytest.raises(InputError, match="is a folder"):
        api.convert("mask-folders", cells, out=tmp_path)
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------- split

def test_split_returns_its_files_and_warns_of_stale_ones(cells, tmp_path, capsys):
    ann = api.convert("mask-folders", cells, out="cells.json")
    files = api.split(ann, out_dir="s", labeled_fraction=0.5, val_fraction=0.25, seed=0)
    assert files == {k: Path("s") / f"{k}.json" for k in ("labeled", "unlabeled", "unlabeled_gt", "val", "split")}
    manifest = json.loads(files["split"].read_text())
    assert manifest["files"] == {k: f"{k}.json" for k in ("labeled", "unlabeled", "unlabeled_gt", "val")}
    assert "split cells.json: 3 images -> labeled 1" in capsys.readouterr().err
    again = api.split(ann, out_dir="s", labeled_fraction=1.0, seed=0)  # no val, nothing unlabeled to score
    assert set(again) == {"labeled", "unlabeled", "split"}
    err = capsys.readouterr().err
    assert f"warning: {Path('s') / 'val.json'} is from an earlier run" in err and "unlabeled_gt.json" in err


def test_split_takes_exactly_one_way_of_choosing_the_labeled_images(cells, tmp_path):
    ann = api.convert("mask-folders", cells, out="cells.json")
    for kwargs in ({}, {"labeled_fraction": 0.5, "labeled_ids": "ids.txt"}):
        with pytest.raises(InputError, match=r"exactly one of labeled_fraction \(--labeled-fraction\) and "
                                             r"labeled_ids \(--labeled-ids\)"):
            api.split(ann, out_dir="s", **kwargs)
    Path("ids.txt").write_text("img001\n")
    files = api.split(ann, out_dir="s", labeled_ids="ids.txt")
    assert [im["file_name"] for im in json.loads(files["labeled"].read_text())["images"]] == \
        ["img001/images/img001.png"]
    assert not Path("s", "val.json").exists()


# ---------------------------------------------------------------- evaluate

def _perfect(ann: Path) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"],
             "segmentation": a["segmentation"]} for a in json.loads(ann.read_text())["annotations"]]


def test_evaluate_a_file_or_records_alike(cells, tmp_path):
    ann = api.convert("mask-folders", cells, out="cells.json")
    preds = _perfect(ann)[:5]  # 5 of 9: recall 5/9
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    stats = api.evaluate(tmp_path / "pred.json", ann)
    assert stats == api.evaluate(preds, str(ann)) and stats["AR100"] == pytest.approx(5 / 9)
    assert api.evaluate(preds, ann, iou_type="bbox", max_dets=200)["AR100"] == pytest.approx(5 / 9)
    assert api.evaluate(_perfect(ann), ann, images_root=cells)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"protocol": "voc"}, "unknown protocol 'voc'"),
    ({"gt_folder": "gtFine"}, r"gt_folder \(--gt-folder\) is for the cityscapes protocol"),
    ({"protocol": "cityscapes"}, r"needs gt_folder \(--gt-folder\)"),
    ({"protocol": "cityscapes", "gt_folder": "gtFine", "iou_type": "bbox"},
     r"masks only; drop iou_type 'bbox' \(--iou-type bbox\)"),
])
def test_evaluate_options_that_do_not_fit_the_protocol(kwargs, match):
    with pytest.raises(InputError, match=match):
        api.evaluate([], "gt.json", **kwargs)  # checked before any file is read


def test_evaluate_names_the_bad_file(cells, tmp_path):
    ann = api.convert("mask-folders", cells, out="cells.json")
    (tmp_path / "pred.json").write_text(json.dumps([dict(_perfect(ann)[0], image_id=999)]))
    with pytest.raises(InputError, match=r"pred.json: record #0: image_id 999"):
        api.evaluate(tmp_path / "pred.json", ann)


# ---------------------------------------------------------------- pseudo_label

class _Boxes:
    """A teacher object (no checkpoint): one 8x10 box per image, score 0.9."""

    class_names = ["nucleus"]

    def __init__(self):
        self.calls = 0

    def predict(self, images, class_names=None):
        self.calls += len(images)
        out = []
        for img in images:
            masks = torch.zeros(1, *img.shape[-2:], dtype=torch.bool)
            masks[0, 4:12, 4:14] = True
            out.append({"masks": masks, "scores": torch.tensor([0.9]), "labels": torch.zeros(1, dtype=torch.int64)})
        return out


def test_pseudo_label_with_a_teacher_object_then_scored(cells, tmp_path):
    ann = api.convert("mask-folders", cells, out="cells.json")
    teacher = _Boxes()
    manifest = api.pseudo_label(teacher, images=ann, out="p.json", chunk_size=2, progress=False)
    assert manifest["finished"] and (manifest["num_images"], manifest["num_instances"]) == (3, 3)
    assert teacher.calls == 3
    assert api.pseudo_label(teacher, images=ann, out="p.json", chunk_size=2, progress=False) == manifest  # reused
    assert teacher.calls == 3
    # the cache is COCO results: the box is the first nucleus of every image (the others are missed)
    stats = api.evaluate("p.json", ann)
    assert stats["AR100"] == pytest.approx(3 / 9)


def test_pseudo_label_from_predictions_and_its_checks(cells, tmp_path):
    ann = api.convert("mask-folders", cells, out="cells.json")
    (tmp_path / "preds.json").write_text(json.dumps(_perfect(ann)))
    manifest = api.pseudo_label(predictions=tmp_path / "preds.json", images=ann, out="p.json", min_score=0.5)
    assert manifest["num_instances"] == 9 and manifest["teacher"]["config"]["type"] == "predictions"
    for kwargs in ({}, {"teacher": "t", "predictions": "p.json"}):
        with pytest.raises(InputError, match=r"exactly one of teacher \(--teacher\) and predictions"):
            api.pseudo_label(images=ann, out="q.json", **kwargs)
    with pytest.raises(InputError, match="missing.json: not found"):
        api.pseudo_label("no-such-teacher", images="missing.json", out="q.json")  # before the teacher loads
    assert not Path("q.json").exists()
