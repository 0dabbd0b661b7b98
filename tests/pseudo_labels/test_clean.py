"""Cleaning pseudo-labels before the student sees them: one instance per pixel, touching convex
objects split apart, specks dropped; every piece keeps its instance's score and class, and the
dataset, the quality report and the stage settings all see the same cleaned instances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from castseg.config import RunConfig
from castseg.data import masks as M
from castseg.pseudo_labels import PseudoLabeledDataset, import_pseudo_labels
from castseg.pseudo_labels.clean import Cleanup, clean_instances, clean_records, split_instance
from castseg.stages import stage_inputs

H, W = 48, 64
EXCLUSIVE = Cleanup(overlaps="exclusive")
ALL = Cleanup(overlaps="exclusive", split_touching=True, min_area=20)


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_touching_discs_are_cut_apart_and_keep_every_pixel():
    left, right = disc(24, 20, 9), disc(24, 38, 9)  # touching: centres 2r apart
    pieces = split_instance(left | right)
    assert len(pieces) == 2
    a, b = sorted(pieces, key=lambda p: np.argwhere(p)[:, 1].mean())
    assert iou(a, left) > 0.9 and iou(b, right) > 0.9
    assert not (a & b).any() and np.array_equal(a | b, left | right)  # a partition: no pixel lost


def test_convex_objects_stay_whole_and_pieces_become_instances():
    for convex in (disc(24, 32, 12), np.pad(np.ones((10, 40), bool), ((19, 19), (12, 12)))):
        (piece,) = split_instance(convex)
        assert np.array_equal(piece, convex)
    apart = disc(12, 12, 5) | disc(36, 50, 6)
    assert sorted(int(p.sum()) for p in split_instance(apart)) == sorted([int(disc(12, 12, 5).sum()),
                                                                          int(disc(36, 50, 6).sum())])


def test_exclusive_drops_duplicates_and_trims_overlaps():
    big, dup, side = disc(24, 24, 10), disc(24, 24, 10), disc(24, 34, 6)
    masks = np.stack([big, dup, side])  # by descending score
    out, source = clean_instances(masks, EXCLUSIVE)
    # the duplicate lost all its pixels; the side blob lost under half and keeps the rest
    assert source.tolist() == [0, 2]
    assert np.array_equal(out[0], big) and np.array_equal(out[1], side & ~big)
    assert out.sum(0).max() == 1
    # one that loses more than half is dropped (keep_fraction 0.5)
    inner = disc(24, 26, 8)
    assert clean_instances(np.stack([big, inner]), EXCLUSIVE)[1].tolist() == [0]
    # the default does nothing at all
    same, src = clean_instances(masks, Cleanup())
    assert same is masks and src.tolist() == [0, 1, 2] and not Cleanup().active


def test_pieces_keep_their_source_and_specks_go():
    pair = disc(24, 20, 9) | disc(24, 38, 9)
    speck = np.zeros((H, W), bool)
    speck[2:5, 60:63] = True                                # 9 px < min_area 20
    lone = disc(8, 8, 4)
    out, source = clean_instances(np.stack([lone, pair | speck]), ALL)
    assert source.tolist() == [0, 1, 1] and all(m.sum() >= 20 for m in out)
    assert not (out.sum(0) > 1).any() and not out[:, 2:5, 60:63].any()


def test_records_are_cleaned_per_image_above_the_threshold():
    pair = disc(24, 20, 9) | disc(24, 38, 9)
    recs = [{"image_id": 1, "category_id": 3, "score": 0.9, "segmentation": M.encode(pair)},
            {"image_id": 1, "category_id": 3, "score": 0.8, "segmentation": M.encode(pair)},  # duplicate
            {"image_id": 2, "category_id": 5, "score": 0.7, "segmentation": M.encode(disc(24, 32, 8))},
            {"image_id": 2, "category_id": 5, "score": 0.1, "segmentation": M.encode(disc(10, 10, 5))}]
    out = clean_records(recs, ALL, score_threshold=0.3)
    assert [(r["image_id"], r["category_id"], r["score"]) for r in out] == [(1, 3, 0.9), (1, 3, 0.9), (2, 5, 0.7)]
    assert all(r["bbox"] == M.bbox(r["segmentation"]) for r in out)
    assert sum(M.area(r["segmentation"]) for r in out[:2]) == int(pair.sum())
    assert clean_records(recs, Cleanup(), 0.3) == recs[:3]


def _cache(tmp_path: Path) -> tuple[Path, Path]:
    """One image whose 'teacher' gives a merged pair (0.9), its duplicate (0.6), and a disc (0.5)."""
    from PIL import Image

    tmp_path.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "a.png")
    images = tmp_path / "images.json"
    images.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
                                  "categories": [{"id": 4, "name": "nucleus"}]}))
    pair = disc(24, 20, 9) | disc(24, 38, 9)
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"image_id": 1, "category_id": 4, "score": s, "segmentation": M.encode(m)}
                                 for s, m in ((0.9, pair), (0.6, pair), (0.5, disc(8, 56, 6)))]))
    import_pseudo_labels(preds, images, tmp_path / "cache.json", min_score=0.1)
    return images, tmp_path / "cache.json"


def test_the_dataset_serves_the_cleaned_instances(tmp_path):
    images, cache = _cache(tmp_path)
    raw = PseudoLabeledDataset(images, cache, score_threshold=0.3, weight_by_score=True)[0]
    assert raw["masks"].shape == (3, H, W)
    item = PseudoLabeledDataset(images, cache, score_threshold=0.3, weight_by_score=True, cleanup=ALL)[0]
    assert item["masks"].shape == (3, H, W) and item["labels"].tolist() == [0, 0, 0]
    assert item["weights"].tolist() == pytest.approx([0.9, 0.9, 0.5])   # the pair's halves keep 0.9
    assert int(item["masks"].sum(0).max()) == 1


def test_config_and_stage_settings(tmp_path):
    images, cache = _cache(tmp_path)
    base = {"data": {"labeled": str(images), "unlabeled": str(images)}}
    cfg = RunConfig.model_validate(base)
    assert Cleanup.from_loss(cfg.loss) == Cleanup()
    on = RunConfig.model_validate({**base, "loss": {"pseudo_label_overlaps": "exclusive", "pseudo_label_split": True,
                                                    "pseudo_label_min_area": 64}})
    assert Cleanup.from_loss(on.loss) == Cleanup("exclusive", True, 64)
    # off, a stage's settings are what they were before cleaning existed (earlier runs still resume);
    # on, they record it (a cleaned run does not resume an uncleaned one)
    assert set(stage_inputs(cfg, 1.0, 0.0, cache)["loss"]) == {"num_points", "score_threshold", "weight_by_score"}
    assert stage_inputs(on, 1.0, 0.0, cache)["loss"]["pseudo_label_min_area"] == 64
    assert "pseudo_label_split" not in stage_inputs(on, 0.0, 0.0, None)["loss"]  # no L_semi: not used
    for bad in ({"pseudo_label_overlaps": "nms"}, {"pseudo_label_min_area": -1}):
        with pytest.raises(ValidationError):
            RunConfig.model_validate({**base, "loss": bad})
