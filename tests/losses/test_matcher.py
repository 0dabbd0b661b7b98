"""Hungarian matcher: optimal assignments, empty images, valid regions, large instance counts."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from castseg.losses.matcher import HungarianMatcher, pairwise_dice, pairwise_sigmoid_ce


def _blocks(n: int, size: int = 32, cell: int = 4, seed: int = 0) -> torch.Tensor:
    """n distinct rectangles aligned to the ``cell`` grid (so stride-``cell`` logits can match)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    cells = size // cell
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(0, cells - 2, (2,), generator=g))
        hh, ww = (int(v) for v in torch.randint(1, 3, (2,), generator=g))
        masks[i, y0 * cell:(y0 + hh + i % 2) * cell, x0 * cell:(x0 + ww) * cell] = True
    return masks


def _perfect(masks: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor, q: int, c: int, cell: int = 4):
    """Logits [Q, C+1] / mask logits [Q, h, w] where query slots[j] predicts target j exactly."""
    logits = torch.full((q, c + 1), -10.0)
    logits[:, c] = 10.0
    coarse = F.avg_pool2d(masks[:, None].float(), cell)[:, 0]
    pm = torch.full((q, *coarse.shape[-2:]), -10.0)
    for j, s in enumerate(slots.tolist()):
        logits[s] = -10.0
        logits[s, labels[j]] = 10.0
        pm[s] = torch.where(coarse[j] > 0.5, 10.0, -10.0)
    return logits, pm


def test_identity_assignment_for_permuted_perfect_predictions():
    n, q, c = 4, 7, 3
    masks = _blocks(n)
    labels = torch.tensor([0, 2, 1, 2])
    slots = torch.tensor([5, 0, 3, 6])
    logits, pm = _perfect(masks, labels, slots, q, c)
    matcher = HungarianMatcher(num_points=512)
    [(qi, ti)] = matcher({"pred_logits": logits[None], "pred_masks": pm[None]},
                         [{"labels": labels, "masks": masks}], generator=torch.Generator().manual_seed(0))
    assert ti.tolist() == [0, 1, 2, 3]  # ordered by target index
    assert qi.tolist() == slots.tolist()
    assert qi.dtype == ti.dtype == torch.int64


def test_assignment_is_minimal_against_brute_force():
    torch.manual_seed(3)
    q, n, c = 4, 3, 2
    logits = torch.randn(q, c + 1)
    pm = torch.randn(q, 6, 6) * 3
    target = {"labels": torch.tensor([1, 0, 1]), "masks": torch.rand(n, 24, 24) > 0.5}
    matcher = HungarianMatcher(num_points=300)
    cost = matcher.cost_matrix(logits, pm, target, generator=torch.Generator().manual_seed(11))
    [(qi, ti)] = matcher({"pred_logits": logits[None], "pred_masks": pm[None]}, [target],
                         generator=torch.Generator().manual_seed(11))
    got = float(cost[qi, ti].sum())
    best = min(float(sum(cost[p[j], j] for j in range(n))) for p in itertools.permutations(range(q), n))
    assert got == pytest.approx(best, abs=1e-5)
    assert len(set(qi.tolist())) == n


def test_pairwise_costs_match_elementwise_definitions():
    torch.manual_seed(0)
    x, t = torch.randn(5, 40), (torch.rand(3, 40) > 0.5).float()
    w = (torch.rand(40) > 0.3).float()
    ce = pairwise_sigmoid_ce(x, t, w)
    dice = pairwise_dice(x, t, w)
    for i in range(5):
        for j in range(3):
            bce = F.binary_cross_entropy_with_logits(x[i], t[j], reduction="none")
            assert ce[i, j] == pytest.approx(float((bce * w).sum() / w.sum()), abs=1e-5)
            s = x[i].sigmoid() * w
            ref = 1 - (2 * (s * t[j]).sum() + 1) / (s.sum() + (t[j] * w).sum() + 1)
            assert dice[i, j] == pytest.approx(float(ref), abs=1e-5)


def test_empty_targets_give_empty_pairs():
    logits, pm = torch.randn(2, 5, 3), torch.randn(2, 5, 8, 8)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)},
               {"labels": torch.tensor([1]), "masks": _blocks(1)}]
    (q0, t0), (q1, t1) = HungarianMatcher(num_points=64)({"pred_logits": logits, "pred_masks": pm}, targets)
    assert q0.numel() == t0.numel() == 0
    assert q1.numel() == t1.numel() == 1


def test_valid_region_ignores_padding():
    # Valid region = left quarter. Target fills it. Query 0 is right inside the region but "on"
    # over the padding too; query 1 is empty. Over the whole frame query 1 is the cheaper one;
    # restricted to the region query 0 is perfect.
    valid = torch.zeros(32, 32, dtype=torch.bool)
    valid[:, :8] = True
    target = {"labels": torch.tensor([0]), "masks": valid[None].clone()}
    logits = torch.zeros(2, 2)
    pm = torch.stack([torch.full((8, 8), 10.0), torch.full((8, 8), -10.0)])
    out = {"pred_logits": logits[None], "pred_masks": pm[None]}
    m = HungarianMatcher(num_points=1024)
    [(q_full, _)] = m(out, [target], generator=torch.Generator().manual_seed(0))
    [(q_valid, _)] = m(out, [dict(target, valid=valid)], generator=torch.Generator().manual_seed(0))
    assert q_full.tolist() == [1]
    assert q_valid.tolist() == [0]


def test_many_instances_one_to_one():
    q, n = 400, 375
    torch.manual_seed(0)
    out = {"pred_logits": torch.randn(1, q, 2), "pred_masks": torch.randn(1, q, 16, 16)}
    target = {"labels": torch.zeros(n, dtype=torch.int64), "masks": torch.rand(n, 64, 64) > 0.9}
    [(qi, ti)] = HungarianMatcher(num_points=256)(out, [target])
    assert ti.tolist() == list(range(n))
    assert len(set(qi.tolist())) == n


def test_more_targets_than_queries_matches_min():
    out = {"pred_logits": torch.randn(1, 2, 2), "pred_masks": torch.randn(1, 2, 8, 8)}
    target = {"labels": torch.zeros(3, dtype=torch.int64), "masks": _blocks(3)}
    [(qi, ti)] = HungarianMatcher(num_points=64)(out, [target])
    assert len(qi) == len(ti) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_autocast_matches_fp32_assignment(dtype):
    """Confident logits summed over Mask2Former's 12,544 points overflow fp16 (inf costs became
    ±1e8 and arbitrary assignments); costs are computed in fp32 with autocast off, as in
    Mask2Former, so fp16/bf16 training matches as fp32 does."""
    n, q, c = 4, 10, 3
    masks = torch.zeros(n, 64, 64, dtype=torch.bool)  # quadrants: ~3,100 of the points each
    for i in range(n):
        masks[i, 32 * (i // 2):32 * (i // 2 + 1), 32 * (i % 2):32 * (i % 2 + 1)] = True
    labels = torch.arange(n) % c
    slots = torch.randperm(q, generator=torch.Generator().manual_seed(0))[:n]
    logits, pm = _perfect(masks, labels, slots, q, c)
    pm = pm * 3.0  # ±30: confident, as a trained model's
    matcher = HungarianMatcher(num_points=12544)
    target = [{"labels": labels, "masks": masks}]
    outputs = {"pred_logits": logits[None], "pred_masks": pm[None]}
    ref = matcher(outputs, target, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype):
        cost = matcher.cost_matrix(logits, pm, target[0], torch.Generator().manual_seed(0))
        got = matcher(outputs, target, generator=torch.Generator().manual_seed(0))
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all() and cost.abs().max() < 1e3
    assert torch.equal(got[0][0], ref[0][0]) and torch.equal(got[0][0], slots)
