"""`castseg eval --protocol cityscapes` on a tiny gtFine folder written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from castseg import cli
from castseg.api import data as api
from castseg.data import masks as M
from castseg.errors import InputError
from castseg.eval import evaluate_cityscapes

pytest.importorskip("cityscapesscripts")

H, W = 64, 128
CITY = "frankfurt"
# Per image: (instance id as in *_instanceIds.png: labelId*1000 + k, y0, x0, y1, x1). Every
# instance is >= 100 px, the official minimum region size below which GT is ignored.
INSTANCES = {
    0: [(26000, 5, 5, 25, 35), (26001, 30, 60, 50, 100), (24000, 10, 100, 40, 115)],
    1: [(26000, 20, 10, 45, 50), (24000, 5, 70, 30, 85), (24001, 35, 90, 60, 105)],
}


@pytest.fixture(autouse=True)
def only_eval_verb(monkeypatch):
    # Other verbs are written in parallel; a half-finished one must not break these tests.
    monkeypatch.setattr(cli, "COMMANDS", ["eval"])


def stem(i: int) -> str:
    return f"{CITY}_000000_{i:06d}"


@pytest.fixture
def cs_data(tmp_path: Path) -> tuple[Path, Path]:
    """``gtFine/val/frankfurt/*_gtFine_instanceIds.png`` (uint16) + the matching COCO GT json."""
    folder = tmp_path / "gtFine" / "val" / CITY
    folder.mkdir(parents=True)
    images = []
    for i, insts in INSTANCES.items():
        ids = np.full((H, W), 7, np.uint16)  # road: a stuff label, no instances
        ids[:, :3] = 1  # ego vehicle: void, ignored by the evaluation
        for inst_id, y0, x0, y1, x1 in insts:
            ids[y0:y1, x0:x1] = inst_id
        Image.fromarray(ids).save(folder / f"{stem(i)}_gtFine_instanceIds.png")
        images.append({"id": 10 + i, "file_name": f"leftImg8bit/val/{CITY}/{stem(i)}_leftImg8bit.png",
                       "height": H, "width": W})
    cats = [{"id": 24, "name": "person"}, {"id": 25, "name": "rider"}, {"id": 26, "name": "car"},
            {"id": 27, "name": "truck"}, {"id": 28, "name": "bus"}, {"id": 31, "name": "train"},
            {"id": 32, "name": "motorcycle"}, {"id": 33, "name": "bicycle"}]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": [], "categories": cats}))
    return tmp_path / "gtFine", gt


def box_record(image_id: int, label: int, box: tuple[int, int, int, int], score: float) -> dict:
    m = np.zeros((H, W), np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = 1
    return {"image_id": image_id, "category_id": label, "score": score, "segmentation": M.encode(m)}


def perfect() -> list[dict]:
    return [box_record(10 + i, inst_id // 1000, (y0, x0, y1, x1), 0.9)
            for i, insts in INSTANCES.items() for inst_id, y0, x0, y1, x1 in insts]


def test_perfect_predictions(cs_data, tmp_path, monkeypatch):
    gt_folder, gt = cs_data
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    stats = evaluate_cityscapes(gt_folder, gt, perfect())
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["per_class"]["car"]["AP"] == pytest.approx(1.0)
    assert stats["per_class"]["person"]["AP"] == pytest.approx(1.0)
    assert stats["per_class"]["bus"]["AP"] == -1.0  # no bus in the GT: undefined, not counted
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no matches.json / gtInstances.json litter


def test_empty_predictions(cs_data):
    gt_folder, gt = cs_data
    stats = evaluate_cityscapes(gt_folder, gt, [])
    assert stats["AP"] == 0.0 and stats["AP50"] == 0.0


def test_partially_right_predictions(cs_data):
    gt_folder, gt = cs_data
    preds = perfect()
    preds[1]["category_id"] = 28  # a car called a bus: a missed car and a false bus
    preds.append(box_record(11, 24, (40, 20, 60, 40), 0.95))  # a confident person where there is none
    stats = evaluate_cityscapes(gt_folder, gt, preds)
    assert 0.0 < stats["AP"] < 1.0
    assert stats["per_class"]["car"]["AP"] < 1.0 and stats["per_class"]["person"]["AP"] < 1.0


def test_api_evaluate_with_the_cityscapes_protocol(cs_data, tmp_path):
    gt_folder, gt = cs_data
    preds = perfect()
    preds[1]["category_id"] = 28  # a car called a bus
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    stats = api.evaluate(tmp_path / "pred.json", gt, protocol="cityscapes", gt_folder=gt_folder)
    assert stats == evaluate_cityscapes(gt_folder, gt, preds) and 0.0 < stats["AP"] < 1.0
    with pytest.raises(InputError, match=r"needs gt_folder \(--gt-folder\)"):
        api.evaluate(preds, gt, protocol="cityscapes")


def test_cli_json(cs_data, tmp_path, capsys):
    gt_folder, gt = cs_data
    (tmp_path / "pred.json").write_text(json.dumps(perfect()))
    argv = ["eval", "--protocol", "cityscapes", "--gt-folder", str(gt_folder), "--gt", str(gt),
            "--pred", str(tmp_path / "pred.json")]
    assert cli.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert out["AP"] == pytest.approx(1.0) and set(out["per_class"]) >= {"car", "person"}
    assert cli.main(argv) == 0
    assert "average" in capsys.readouterr().out


def test_cli_errors(cs_data, tmp_path, capsys):
    gt_folder, gt = cs_data
    (tmp_path / "pred.json").write_text(json.dumps([dict(perfect()[0], image_id=5)]))
    code = cli.main(["eval", "--protocol", "cityscapes", "--gt", str(gt), "--pred", str(tmp_path / "pred.json")])
    assert code == 2 and "--gt-folder" in capsys.readouterr().err
    code = cli.main(["eval", "--protocol", "cityscapes", "--gt-folder", str(gt_folder), "--gt", str(gt),
                     "--pred", str(tmp_path / "pred.json")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "pred.json") in err and "image_id 5" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_gt_file_and_wrong_ids(cs_data):
    gt_folder, gt = cs_data
    data = json.loads(gt.read_text())
    (gt_folder / "val" / CITY / f"{stem(1)}_gtFine_instanceIds.png").unlink()
    with pytest.raises(InputError, match="no gtFine instanceIds file"):
        evaluate_cityscapes(gt_folder, data, [])
    data["categories"].append({"id": 1, "name": "cell"})
    with pytest.raises(InputError, match="not a Cityscapes instance label id"):
        evaluate_cityscapes(gt_folder, data, [])
