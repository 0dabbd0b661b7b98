"""Predictions made elsewhere become a pseudo-label cache: the same records and masks every stage
reads, reused when unchanged, and one-line errors naming the record when they do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from castseg import cli
from castseg.data import masks as M
from castseg.data.coco_io import annotation_rle, load_coco, write_json
from castseg.data.convert import convert
from castseg.errors import InputError
from castseg.pseudo_labels import PseudoLabeledDataset, import_pseudo_labels, load_pseudo_labels, read_manifest


@pytest.fixture
def labelled(tiny_mask_folders: Path, tmp_path: Path) -> Path:
    """A 3-image COCO json with 2 / 3 / 4 rectangles (its annotations: polygons or RLE)."""
    out = tmp_path / "gt.json"
    write_json(convert("mask-folders", tiny_mask_folders), out)
    return out


def _results(gt: Path, scores=(0.9, 0.2)) -> list[dict]:
    """Every annotation as a result record, alternating ``scores``."""
    coco = load_coco(gt)
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": scores[i % len(scores)],
             "segmentation": annotation_rle(a, coco.image_by_id[a["image_id"]])} for i, a in enumerate(coco.annotations)]


def test_results_list_becomes_a_cache_read_at_the_threshold(labelled: Path, tmp_path: Path):
    preds = tmp_path / "preds.json"
    records = _results(labelled)
    write_json(records, preds)
    out = tmp_path / "cache.json"
    manifest = import_pseudo_labels(preds, labelled, out, min_score=0.1)
    assert manifest["finished"] and manifest["num_instances"] == len(records) == 9
    assert manifest["teacher"]["config"] == {"type": "predictions", "path": str(preds)}
    got = load_pseudo_labels(out, labelled, score_threshold=0.5)
    kept = [r for r in records if r["score"] >= 0.5]
    assert sum(len(v["masks"]) for v in got.values()) == len(kept) == 5
    for r in kept:  # masks byte-identical, bbox written as the generator writes it
        assert r["segmentation"] in got[r["image_id"]]["masks"]
    cached = json.loads(out.read_text())
    assert all(c["bbox"] == M.bbox(c["segmentation"]) for c in cached)
    # below min_score: not in the file at all
    assert import_pseudo_labels(preds, labelled, tmp_path / "hi.json", min_score=0.5)["num_instances"] == 5
    assert len(json.loads((tmp_path / "hi.json").read_text())) == 5


def test_coco_annotations_are_a_perfect_teacher(labelled: Path, tmp_path: Path):
    """A labelled json's own annotations, score 1: the dataset serves exactly the GT masks."""
    out = tmp_path / "gt_cache.json"
    import_pseudo_labels(labelled, labelled, out)
    ds = PseudoLabeledDataset(labelled, out, score_threshold=0.99)
    coco = load_coco(labelled)
    for i in range(len(ds)):
        item = ds[i]
        img = coco.image_by_id[item["image_id"]]
        want = np.stack([M.decode(M.segmentation_to_rle(a["segmentation"], img["height"], img["width"]))
                         for a in coco.anns_by_image[img["id"]]]).astype(bool)
        got = item["masks"].numpy()
        assert got.shape == want.shape and {m.tobytes() for m in got} == {m.tobytes() for m in want}
        assert item["scores"].tolist() == [1.0] * len(want)


def test_unchanged_predictions_are_reused_changed_ones_refused(labelled: Path, tmp_path: Path):
    preds, out = tmp_path / "preds.json", tmp_path / "cache.json"
    write_json(_results(labelled), preds)
    import_pseudo_labels(preds, labelled, out)
    first = out.read_bytes()
    assert import_pseudo_labels(preds, labelled, out)["num_instances"] == 9 and out.read_bytes() == first
    write_json(_results(labelled, scores=(0.7,)), preds)
    with pytest.raises(InputError, match="different teacher_sha256"):
        import_pseudo_labels(preds, labelled, out)
    assert out.read_bytes() == first  # nothing of the earlier cache is lost
    import_pseudo_labels(preds, labelled, out, overwrite=True)
    assert {r["score"] for r in json.loads(out.read_text())} == {0.7}


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(image_id=999), "record #1: image_id 999 is not one of the images"),
    (lambda r: r.update(category_id=5), "record #1: category_id 5 is not one of"),
    (lambda r: r.update(score="high"), "record #1: score must be a finite number"),
    (lambda r: r.update(score=float("nan")), "record #1: score must be a finite number"),
    (lambda r: r["segmentation"].update(size=[3, 3]), "record #1: RLE size \\[3, 3\\] does not match"),
    (lambda r: r.pop("segmentation"), "record #1: needs image_id"),
])
def test_a_bad_record_is_named_and_nothing_is_written(labelled: Path, tmp_path: Path, change, message):
    records = _results(labelled)
    change(records[1])
    preds, out = tmp_path / "preds.json", tmp_path / "cache.json"
    preds.write_text(json.dumps(records))
    with pytest.raises(InputError, match=message):
        import_pseudo_labels(preds, labelled, out)
    assert not out.exists() and not Path(str(out) + ".manifest.json").exists()


def test_a_coco_json_is_matched_by_file_name(labelled: Path, tmp_path: Path):
    """Other image ids, same files: each annotation lands on its file's image; a file that is
    not among the images is refused."""
    data = json.loads(labelled.read_text())
    root = str(labelled.parent / load_coco(labelled).images_root)
    for img in data["images"]:
        img["id"] += 1000
    data["images"].reverse()  # nor are they in the same order
    for a in data["annotations"]:
        a["image_id"] += 1000
    renumbered = tmp_path / "renumbered.json"
    renumbered.write_text(json.dumps({**data, "images_root": root}))
    import_pseudo_labels(renumbered, labelled, tmp_path / "a.json")
    import_pseudo_labels(labelled, labelled, tmp_path / "b.json")
    got, want = (load_pseudo_labels(tmp_path / f, labelled) for f in ("a.json", "b.json"))
    assert got == want and sum(len(v["masks"]) for v in got.values()) == 9
    data["images"][0]["file_name"] = "elsewhere.png"
    renumbered.write_text(json.dumps({**data, "images_root": root}))
    with pytest.raises(InputError, match="1 of its images are not images of .*first: 'elsewhere.png'"):
        import_pseudo_labels(renumbered, labelled, tmp_path / "c.json")


def test_cli_imports_predictions_and_fails_in_one_line(labelled: Path, tmp_path: Path, capsys):
    preds, out = tmp_path / "preds.json", tmp_path / "cache.json"
    write_json(_results(labelled), preds)
    assert cli.main(["pseudo-label", "--predictions", str(preds), "--images", str(labelled), "--out", str(out)]) == 0
    assert read_manifest(out)["num_instances"] == 9
    capsys.readouterr()
    preds.write_text(json.dumps([{"image_id": 999, "category_id": 1, "score": 1, "segmentation": []}]))
    code = cli.main(["pseudo-label", "--predictions", str(preds), "--images", str(labelled),
                     "--out", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "record #0: image_id 999" in err[0] and "Traceback" not in err[0]
