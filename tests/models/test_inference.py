"""Instance inference: scores, top-k, chunked upsampling, crops/resizes, COCO records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from castseg.data.masks import decode
from castseg.models import inference
from castseg.models.inference import postprocess_instances, to_coco_results

C = 3


def _perfect_case(stride: int = 4):
    """Padded input 32×32 (masks at 32/stride), valid image 24×32, original 48×64 (the model saw
    it downscaled ×2). GT rectangles sit on the 4-px grid, so the masks can represent them."""
    boxes = [(0, 0, 2, 3), (2, 4, 6, 8), (4, 1, 6, 3)]  # (y0, x0, y1, x1) in 4-px cells, in the 6×8 valid cells
    labels = [2, 0, 2]
    q, r = 6, 4 // stride
    logits = torch.full((1, q, C + 1), -20.0)
    logits[0, :, C] = 20.0
    pm = torch.full((1, q, 8 * r, 8 * r), -50.0)
    gt = torch.zeros(len(boxes), 48, 64, dtype=torch.bool)
    for j, ((y0, x0, y1, x1), lab) in enumerate(zip(boxes, labels)):
        slot = 5 - j
        logits[0, slot, C] = -20.0
        logits[0, slot, lab] = 20.0
        pm[0, slot, y0 * r:y1 * r, x0 * r:x1 * r] = 50.0
        gt[j, y0 * 8:y1 * 8, x0 * 8:x1 * 8] = True  # ×4 to input, ×2 to original
    return logits, pm, gt, labels


@pytest.mark.parametrize("stride", [4, 1])
def test_perfect_predictions_give_gt_masks_at_original_size(stride):
    logits, pm, gt, labels = _perfect_case(stride)
    [res] = postprocess_instances(logits, pm, [(24, 32)], [(48, 64)], mask_stride=stride)
    assert res["masks"].shape == (len(res["scores"]), 48, 64) and res["masks"].dtype == torch.bool
    assert res["labels"].dtype == torch.int64
    top = len(gt)
    assert (res["scores"][:top] > 0.95).all() and (res["scores"][top:] < 1e-3).all()
    for j in range(top):
        k = [k for k in range(top) if int(res["labels"][k]) == labels[j]
             and (res["masks"][k] & gt[j]).sum() > 0.5 * gt[j].sum()]
        assert len(k) == 1, f"GT {j} not recovered"
        m = res["masks"][k[0]]
        if stride == 1:
            assert torch.equal(m, gt[j])  # crop + resize to the original size are exact
        else:
            # bilinear ×4 upsampling of coarse logits rounds each rectangle corner by a few pixels
            assert not (m & ~gt[j]).any()
            assert (m & gt[j]).sum() / gt[j].sum() > 0.9


def test_topk_order_and_count():
    torch.manual_seed(0)
    logits, pm = torch.randn(2, 10, C + 1), torch.randn(2, 10, 8, 8)
    for k in (5, 100):
        for res in postprocess_instances(logits, pm, [(32, 32), (20, 30)], [(32, 32), (40, 60)], topk=k):
            assert len(res["scores"]) == min(k, 10 * C)
            assert (res["scores"][:-1] >= res["scores"][1:]).all()
            assert ((res["labels"] >= 0) & (res["labels"] < C)).all()
    [r0, r1] = postprocess_instances(logits, pm, [(32, 32), (20, 30)], [(32, 32), (40, 60)])
    assert r0["masks"].shape[1:] == (32, 32) and r1["masks"].shape[1:] == (40, 60)


def test_scores_are_class_prob_times_mask_prob():
    torch.manual_seed(1)
    logits, pm = torch.randn(1, 4, C + 1), torch.randn(1, 4, 8, 8) * 3
    [res] = postprocess_instances(logits, pm, [(32, 32)], [(32, 32)], topk=4 * C)
    prob = logits[0].softmax(-1)[:, :C]
    up = F.interpolate(pm, size=(32, 32), mode="bilinear", align_corners=False)[0].sigmoid()
    for m, s, lab in zip(res["masks"], res["scores"], res["labels"]):
        q = next(i for i in range(4) if torch.equal(up[i] > 0.5, m))
        mask_score = float((up[q] * m).sum() / m.sum().clamp(min=1))
        assert float(s) == pytest.approx(float(prob[q, lab]) * mask_score, rel=1e-5)


def test_chunked_equals_unchunked():
    torch.manual_seed(2)
    logits, pm = torch.randn(2, 20, C + 1), torch.randn(2, 20, 8, 8) * 2
    args = (logits, pm, [(30, 28), (32, 32)], [(45, 42), (17, 19)])
    a = postprocess_instances(*args, topk=25, chunk_size=3)
    b = postprocess_instances(*args, topk=25, chunk_size=1000)
    for ra, rb in zip(a, b):
        for key in ("masks", "scores", "labels"):
            assert torch.equal(ra[key], rb[key]), key


def test_score_threshold_filters():
    torch.manual_seed(3)
    logits, pm = torch.randn(1, 10, C + 1), torch.randn(1, 10, 8, 8)
    [full] = postprocess_instances(logits, pm, [(32, 32)], [(32, 32)])
    thr = float(full["scores"].median())
    [cut] = postprocess_instances(logits, pm, [(32, 32)], [(32, 32)], score_threshold=thr)
    keep = full["scores"] >= thr
    assert 0 < len(cut["scores"]) < len(full["scores"])
    assert torch.equal(cut["scores"], full["scores"][keep]) and torch.equal(cut["masks"], full["masks"][keep])


def test_upsampling_is_chunked_and_only_for_selected_queries(monkeypatch):
    calls = []
    real = F.interpolate

    def spy(x, *a, **kw):
        calls.append(x.shape[0] * x.shape[1])
        return real(x, *a, **kw)

    monkeypatch.setattr(inference.F, "interpolate", spy)
    torch.manual_seed(4)
    q = 50
    logits, pm = torch.randn(1, q, C + 1), torch.randn(1, q, 8, 8)
    [res] = postprocess_instances(logits, pm, [(30, 30)], [(60, 60)], topk=20, chunk_size=4)
    assert calls and max(calls) <= 4
    # each selected query is upsampled twice (padded size, then original size), no more
    n_queries = sum(calls) // 2
    assert n_queries <= 20 < q
    assert len(res["scores"]) == 20


def test_empty_and_edge_cases():
    logits, pm = torch.randn(1, 3, C + 1), torch.randn(1, 3, 8, 8)
    [res] = postprocess_instances(logits, pm, [(32, 32)], [(10, 12)], topk=0)
    assert res["masks"].shape == (0, 10, 12) and res["scores"].numel() == 0
    assert to_coco_results(res, 1, [1, 2, 3]) == []
    with pytest.raises(ValueError):
        postprocess_instances(logits, pm, [(32, 32)], [(32, 32), (32, 32)])


def test_to_coco_results():
    masks = np.zeros((2, 10, 12), dtype=bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 0:10, 0:1] = True
    inst = {"masks": torch.from_numpy(masks), "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([1, 0])}
    recs = to_coco_results(inst, image_id=7, cat_ids=[11, 22])
    assert [r["category_id"] for r in recs] == [22, 11]
    assert [r["image_id"] for r in recs] == [7, 7]
    assert recs[0]["score"] == pytest.approx(0.9) and isinstance(recs[0]["score"], float)
    assert recs[0]["bbox"] == [3.0, 2.0, 6.0, 3.0] and recs[1]["bbox"] == [0.0, 0.0, 1.0, 10.0]
    for r, m in zip(recs, masks):
        assert isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [10, 12]
        assert np.array_equal(decode(r["segmentation"]).astype(bool), m)
    with pytest.raises(ValueError):
        to_coco_results(dict(inst, labels=torch.tensor([2, 0])), 7, [11, 22])
