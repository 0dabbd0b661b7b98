"""Set loss (L_sup / L_semi) and point sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from castseg.losses import HungarianMatcher, SetLoss, point_sample, uncertain_points

C, Q, S = 3, 8, 32  # classes, queries, padded input size (pred masks at S/4)


def _targets(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (3, 2):
        masks = torch.zeros(n, S, S, dtype=torch.bool)
        for i in range(n):
            y, x = (int(v) * 4 for v in torch.randint(0, 5, (2,), generator=g))
            masks[i, y:y + 8 + 4 * i, x:x + 12] = True
        out.append({"labels": torch.randint(0, C, (n,), generator=g), "masks": masks})
    return out


def _perfect_outputs(targets, noise: float = 0.0, seed: int = 0):
    """Outputs where query 2j predicts target j (logits ±8), plus optional noise."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((len(targets), Q, C + 1), -8.0)
    logits[..., C] = 8.0
    pm = torch.full((len(targets), Q, S // 4, S // 4), -8.0)
    for b, t in enumerate(targets):
        coarse = F.avg_pool2d(t["masks"][:, None].float(), 4)[:, 0]
        for j, lab in enumerate(t["labels"].tolist()):
            logits[b, 2 * j] = -8.0
            logits[b, 2 * j, lab] = 8.0
            pm[b, 2 * j] = torch.where(coarse[j] > 0.5, 8.0, -8.0)
    logits = logits + noise * torch.randn(logits.shape, generator=g)
    pm = pm + noise * torch.randn(pm.shape, generator=g)
    return {"pred_logits": logits, "pred_masks": pm}


def _loss(num_points: int = 256) -> SetLoss:
    return SetLoss(C, HungarianMatcher(num_points=num_points), num_points=num_points)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_point_sample_matches_grid_sample_border_mode():
    torch.manual_seed(0)
    v = torch.randn(3, 7, 9)
    pts = torch.rand(3, 50, 2)
    ref = F.grid_sample(v[:, None], (2 * pts - 1)[:, :, None], mode="bilinear", padding_mode="border",
                        align_corners=False)[:, 0, :, 0]
    assert torch.allclose(point_sample(v, pts), ref, atol=1e-5)
    assert torch.allclose(point_sample(v, pts[0]), point_sample(v, pts[0].expand(3, -1, -1)))
    # bool maps sample to the same values as their float copies
    b = v > 0
    assert torch.allclose(point_sample(b, pts), point_sample(b.float(), pts))
    near = F.grid_sample(v[:, None], (2 * pts - 1)[:, :, None], mode="nearest", align_corners=False)[:, 0, :, 0]
    assert torch.allclose(point_sample(v, pts, mode="nearest"), near)


def test_point_frames_agree_across_resolutions():
    # Pixel centres of a 32² grid hit the same values in the 2×-upsampled 64² map and in the
    # 8² map of its 4×4 block means: one normalised frame at every resolution.
    torch.manual_seed(1)
    coarse = torch.randn(2, 8, 8)
    fine = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)      # 32²
    finer = fine.repeat_interleave(2, 1).repeat_interleave(2, 2)       # 64²
    ii, jj = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    centres = torch.stack([(jj + 0.5) / 32, (ii + 0.5) / 32], -1).reshape(-1, 2)
    assert torch.allclose(point_sample(fine, centres), fine.reshape(2, -1))
    assert torch.allclose(point_sample(finer, centres), fine.reshape(2, -1))
    ci, cj = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    ccentres = torch.stack([(cj + 0.5) / 8, (ci + 0.5) / 8], -1).reshape(-1, 2)
    assert torch.allclose(point_sample(coarse, ccentres), point_sample(fine, ccentres), atol=1e-6)


def test_uncertain_points_prefer_boundaries():
    x = (torch.arange(16) + 0.5) / 16
    logits = (40 * (x - 0.5)).expand(1, 16, 16)  # decision boundary at x = 0.5
    pts = uncertain_points(logits, 200, 3.0, 0.75, torch.zeros(1, 2), torch.ones(1, 2), generator=_gen())
    assert pts.shape == (1, 200, 2)
    # the 150 importance-sampled points are the quarter of 600 candidates closest to the
    # boundary (|x − 0.5| ≲ 0.125); the 50 random ones are spread out
    assert ((pts[0, :150, 0] - 0.5).abs() < 0.15).float().mean() > 0.95
    assert ((pts[0, 150:, 0] - 0.5).abs() > 0.15).float().mean() > 0.5


def test_keys_and_total():
    targets = _targets()
    out = _perfect_outputs(targets, noise=1.0)
    out["aux_outputs"] = [_perfect_outputs(targets, noise=2.0, seed=s) for s in (1, 2)]
    crit = _loss()
    losses = crit(out, targets, generator=_gen())
    for k in ("loss_ce", "loss_mask", "loss_dice"):
        assert {k, k + "_aux0", k + "_aux1", k + "_sum"} <= losses.keys()
        assert losses[k + "_sum"] == pytest.approx(float(losses[k] + losses[k + "_aux0"] + losses[k + "_aux1"]))
    expected = 2 * losses["loss_ce_sum"] + 5 * losses["loss_mask_sum"] + 5 * losses["loss_dice_sum"]
    assert losses["loss"] == pytest.approx(float(expected))
    assert all(torch.isfinite(v) for v in losses.values())


def test_loss_decreases_towards_targets():
    targets = _targets()
    perfect = _perfect_outputs(targets)
    rand = {"pred_logits": torch.randn(2, Q, C + 1, generator=_gen(5)),
            "pred_masks": torch.randn(2, Q, S // 4, S // 4, generator=_gen(6))}
    mid = {k: 0.5 * perfect[k] + 0.5 * rand[k] for k in perfect}
    crit = _loss()
    values = [float(crit(o, targets, generator=_gen())["loss"]) for o in (rand, mid, perfect)]
    assert values[0] > values[1] > values[2]
    assert values[2] < 0.5 * values[0]


def test_gradients_reach_final_and_aux_outputs():
    targets = _targets()
    out = {k: v.clone().requires_grad_() for k, v in _perfect_outputs(targets, noise=3.0).items()}
    aux = {k: v.clone().requires_grad_() for k, v in _perfect_outputs(targets, noise=3.0, seed=1).items()}
    out["aux_outputs"] = [aux]
    _loss()(out, targets, generator=_gen())["loss"].backward()
    for t in (out["pred_logits"], out["pred_masks"], aux["pred_logits"], aux["pred_masks"]):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_image_without_targets_only_pushes_no_object():
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, S, S, dtype=torch.bool)}]
    logits = torch.randn(1, Q, C + 1, requires_grad=True)
    pm = torch.randn(1, Q, 8, 8, requires_grad=True)
    losses = _loss()({"pred_logits": logits, "pred_masks": pm}, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_mask"].detach()) == 0 and float(losses["loss_dice"].detach()) == 0
    ref = F.cross_entropy(logits[0].detach(), torch.full((Q,), C))  # all weights 0.1: a plain mean
    assert float(losses["loss_ce"].detach()) == pytest.approx(float(ref), rel=1e-5)
    losses["loss"].backward()
    assert pm.grad is not None and float(pm.grad.abs().sum()) == 0  # graph intact, no mask signal


def test_zero_weight_removes_instance():
    targets = _targets()
    out = _perfect_outputs(targets, noise=2.0)
    crit = _loss()
    weighted = [dict(t) for t in targets]
    weighted[1] = dict(targets[1], weights=torch.tensor([1.0, 0.0]))
    dropped = [targets[0], {"labels": targets[1]["labels"][:1], "masks": targets[1]["masks"][:1]}]
    a = crit(out, weighted, generator=_gen(7))
    b = crit(out, dropped, generator=_gen(7))
    assert float(a["loss_mask"]) == pytest.approx(float(b["loss_mask"]), rel=1e-6)
    assert float(a["loss_dice"]) == pytest.approx(float(b["loss_dice"]), rel=1e-6)
    # the ignored instance's query is left out of the CE instead of being pushed to no-object
    assert float(a["loss_ce"]) != pytest.approx(float(b["loss_ce"]), rel=1e-6)


def test_weights_scale_mask_terms():
    targets = _targets()
    out = _perfect_outputs(targets, noise=2.0)
    crit = _loss()
    half = [dict(t, weights=torch.full((len(t["labels"]),), 0.5)) for t in targets]
    a, b = crit(out, targets, generator=_gen(1)), crit(out, half, generator=_gen(1))
    assert float(b["loss_mask"]) == pytest.approx(0.5 * float(a["loss_mask"]), rel=1e-5)
    assert float(b["loss_dice"]) == pytest.approx(0.5 * float(a["loss_dice"]), rel=1e-5)


@pytest.mark.parametrize("shape", ["box", "L"])
def test_valid_region_excludes_padding(shape):
    # "box": the image is the left half (16 of 32 input columns = 4 of 8 prediction columns).
    # "L": the bottom-right quarter is invalid (irregular region: points are weighted).
    targets = _targets()
    valid = torch.ones(S, S, dtype=torch.bool)
    if shape == "box":
        valid[:, 16:] = False
        pad_pred, pad_tgt = (slice(None), slice(5, None)), (slice(None), slice(17, None))
    else:
        valid[16:, 16:] = False
        pad_pred, pad_tgt = (slice(5, None), slice(5, None)), (slice(17, None), slice(17, None))
    for t in targets:
        t["masks"] &= valid
        t["valid"] = valid
    out = _perfect_outputs(targets, noise=1.0)
    # Garbage beyond the half-pixel that bilinear sampling can reach from inside the region.
    noisy_out = {k: v.clone() for k, v in out.items()}
    pm = noisy_out["pred_masks"]
    pm[(..., *pad_pred)] = torch.randn(pm[(..., *pad_pred)].shape, generator=_gen(3)) * 9
    noisy_targets = [dict(t, masks=t["masks"].clone()) for t in targets]
    for t in noisy_targets:
        t["masks"][(slice(None), *pad_tgt)] = True
    crit = _loss()
    a = crit(out, targets, generator=_gen(2))
    b = crit(noisy_out, noisy_targets, generator=_gen(2))
    for k in ("loss_ce", "loss_mask", "loss_dice"):
        assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6), k
    # without the region the padding garbage is penalised
    no_valid = [{k: v for k, v in t.items() if k != "valid"} for t in noisy_targets]
    c = crit(noisy_out, no_valid, generator=_gen(2))
    assert float(c["loss_mask"]) > 2 * float(a["loss_mask"])


def test_target_resolution_does_not_matter():
    targets = _targets()
    big = [dict(t, masks=t["masks"].repeat_interleave(2, 1).repeat_interleave(2, 2)) for t in targets]
    out = _perfect_outputs(targets, noise=2.0)
    # uniform points: importance sampling would concentrate on the edges, where the two
    # resolutions legitimately differ by half a pixel of interpolation
    crit = SetLoss(C, HungarianMatcher(num_points=2048), num_points=2048, importance_sample_ratio=0.0)
    a, b = crit(out, targets, generator=_gen(4)), crit(out, big, generator=_gen(4))
    # edges are half a pixel softer at 32² than at 64², hence a tolerance
    assert float(b["loss_mask"]) == pytest.approx(float(a["loss_mask"]), rel=0.2)
    assert float(b["loss_dice"]) == pytest.approx(float(a["loss_dice"]), rel=0.2)


def test_bad_inputs_raise():
    targets = _targets()
    out = _perfect_outputs(targets)
    with pytest.raises(ValueError, match="labels"):
        _loss()(out, [targets[0], dict(targets[1], labels=torch.tensor([0, C]))])
    with pytest.raises(ValueError, match="classes"):
        SetLoss(C + 1)(out, targets)
