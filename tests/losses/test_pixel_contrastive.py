"""L_pxl (METHOD.md, "The instance-aware pixel-wise contrastive loss"): formula, stop-grad,
sampler semantics (modes, without replacement, s_deb = 0, padding, self-exclusion), the
monitors (margin, FNR) and the memory bound. Tiny grids: every test runs in about a second."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from castseg.losses.pixel_contrastive import (SAMPLERS, PixelContrastiveLoss, debias_weights, sample_negatives,
                                              sampler_features)


@pytest.fixture(autouse=True)
def one_thread():
    # These ops are tiny: with 2 OpenMP threads on a shared 2-core machine they spend far more
    # time waiting for each other than computing (measured ~30x slower), so run them on one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quadrants(B: int, H: int, W: int) -> torch.Tensor:
    """``[B,H,W]`` instance ids 0..3, one per quadrant, the same layout in every image."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ids = (ys >= H // 2).long() * 2 + (xs >= W // 2).long()
    return ids.expand(B, H, W).clone()


def confident_preds(ids: torch.Tensor, K: int = 6, num_classes: int = 2, peak: float = 10.0):
    """Mask logits ``[B,K,H,W]`` peaked on query i inside instance i; class logits ``[B,K,C+1]``
    confident: queries 0,1 -> class 0, 2,3 -> class 1, the rest -> no object."""
    B, H, W = ids.shape
    mask = torch.zeros(B, K, H, W)
    mask.scatter_(1, ids[:, None], peak)
    cls = torch.zeros(B, K, num_classes + 1)
    for k in range(K):
        cls[:, k, min(k // 2, num_classes)] = peak
    return mask, cls


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_loss_matches_loop_reference():
    torch.manual_seed(0)
    B, D, H, W, K, C = 2, 8, 6, 6, 3, 2
    zw, zs = torch.randn(B, D, H, W), torch.randn(B, D, H, W)
    mask, cls = torch.randn(B, K, 3, 3) * 3, torch.randn(B, K, C + 1) * 3   # mask logits at another resolution
    loss_fn = PixelContrastiveLoss(temperature=0.2, num_negatives=10, sampler="fused")
    loss = loss_fn(zw, zs, mask, cls, generator=gen(1))
    idx = loss_fn.last_indices
    anchors, pool, neg, ok = idx["anchors"], idx["pool"], idx["negatives"], idx["ok"]
    assert len(anchors) == B * H * W and neg.shape == (B * H * W, 10) and bool(ok.all())

    # the sampler features, pixel by pixel from the formula
    up = F.interpolate(mask, size=(H, W), mode="bilinear", align_corners=False)
    def y_ref(g: int) -> torch.Tensor:
        b, p = divmod(int(g), H * W)
        m = up[b, :, p // W, p % W]
        pm = torch.exp(m) / torch.exp(m).sum()
        pc = torch.exp(cls[b]) / torch.exp(cls[b]).sum(dim=1, keepdim=True)
        fc = torch.stack([sum(pm[k] * pc[k, c] for k in range(K)) for c in range(C + 1)])
        y = torch.cat([pm, fc])
        return y / y.norm()
    y = sampler_features(mask, cls, pool // (H * W), pool % (H * W), (H, W), "fused")
    for i in range(0, len(pool), 7):
        assert torch.allclose(y[i], y_ref(pool[i]), atol=1e-5)

    # the loss, anchor by anchor: negatives from the strong view (the default)
    def z(t: torch.Tensor, g: int) -> torch.Tensor:
        b, p = divmod(int(g), H * W)
        v = t[b, :, p // W, p % W]
        return v / v.norm()
    total = 0.0
    for a in range(len(anchors)):
        s_pos = float(z(zw, anchors[a]) @ z(zs, anchors[a])) / 0.2
        s_neg = [float(z(zw, anchors[a]) @ z(zs, pool[neg[a, r]])) / 0.2 for r in range(neg.shape[1])]
        total += -math.log(math.exp(s_pos) / (math.exp(s_pos) + sum(math.exp(s) for s in s_neg)))
    assert abs(loss.item() - total / len(anchors)) < 1e-5


def test_negatives_from_weak_uses_weak_embeddings():
    torch.manual_seed(1)
    zw, zs = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    mask, cls = confident_preds(quadrants(1, 4, 4))
    a = PixelContrastiveLoss(num_negatives=5, negatives_from="weak")(zw, zs, mask, cls, generator=gen(0))
    b = PixelContrastiveLoss(num_negatives=5, negatives_from="strong")(zw, zs, mask, cls, generator=gen(0))
    assert not torch.isclose(a, b)


def test_gradient_reaches_z_weak_only():
    torch.manual_seed(0)
    zw = torch.randn(2, 8, 6, 6, requires_grad=True)
    zs = torch.randn(2, 8, 6, 6, requires_grad=True)
    mask = torch.randn(2, 3, 6, 6, requires_grad=True)
    cls = torch.randn(2, 3, 3, requires_grad=True)
    for neg_from in ("strong", "weak"):
        PixelContrastiveLoss(num_negatives=8, negatives_from=neg_from)(zw, zs, mask, cls, generator=gen(0)).backward()
        assert zw.grad is not None and zw.grad.abs().sum() > 0
        assert zs.grad is None and mask.grad is None and cls.grad is None


def test_perfect_embeddings_beat_random():
    ids = quadrants(2, 8, 8)
    mask, cls = confident_preds(ids)
    perfect = F.one_hot(ids, 8).permute(0, 3, 1, 2).float()          # one-hot per instance
    loss_fn = PixelContrastiveLoss(num_negatives=32)
    good = loss_fn(perfect, perfect.clone(), mask, cls, generator=gen(0))
    assert loss_fn.last_stats["margin"] == pytest.approx(1.0, abs=1e-5)  # pos dist 0, neg dist 1
    torch.manual_seed(0)
    bad = loss_fn(torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8), mask, cls, generator=gen(0))
    assert good.item() < 0.1 < bad.item()


def test_fnr_fused_low_uniform_at_same_instance_share():
    ids = quadrants(2, 16, 16)
    mask, cls = confident_preds(ids)
    torch.manual_seed(0)
    z = torch.randn(2, 8, 16, 16)
    fused = PixelContrastiveLoss(num_negatives=64, sampler="fused")
    fused(z, z, mask, cls, instance_ids=ids, generator=gen(0))
    assert fused.last_stats["fnr"] < 0.1
    # uniform: the chance that a random other pixel of the batch is in the anchor's (b, id)
    # instance; counting ids only per image (cross-image pairs never "same instance")
    key = (torch.arange(2)[:, None, None] * 4 + ids).flatten()
    sizes = torch.bincount(key).double()
    N = key.numel()
    expected = float((sizes * (sizes - 1)).sum() / (N * (N - 1)))     # 0.123 here; 0.248 if keyed by id only
    uni = PixelContrastiveLoss(num_negatives=64, sampler="uniform")
    uni(z, z, mask, cls, instance_ids=ids, generator=gen(0))
    assert uni.last_stats["fnr"] == pytest.approx(expected, abs=0.02)


def test_margin_grows_when_training_toy_embedding():
    torch.manual_seed(0)
    ids = quadrants(1, 8, 8)
    mask, cls = confident_preds(ids)
    z = torch.nn.Parameter(torch.randn(1, 16, 8, 8))
    opt = torch.optim.Adam([z], lr=0.1)
    loss_fn = PixelContrastiveLoss(num_negatives=16, max_anchors=32)
    g, margins = gen(0), []
    for _ in range(200):
        strong = z.detach() + 0.05 * torch.randn_like(z)            # same pixels, photometric-like noise
        loss = loss_fn(z, strong, mask, cls, instance_ids=ids, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        margins.append(loss_fn.last_stats["margin"])
    first, last = sum(margins[:10]) / 10, sum(margins[-10:]) / 10
    mid = sum(margins[95:105]) / 10
    assert first < mid < last and last > first + 0.1, (first, mid, last)   # measured: 1.00 -> 1.12 -> 1.19


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("replacement", [False, True])
def test_sampler_modes_self_exclusion_and_duplicates(sampler, replacement):
    torch.manual_seed(0)
    zw, zs = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    mask, cls = torch.randn(2, 5, 6, 6), torch.randn(2, 5, 4)
    loss_fn = PixelContrastiveLoss(num_negatives=12, sampler=sampler, sample_with_replacement=replacement)
    loss = loss_fn(zw, zs, mask, cls, instance_ids=quadrants(2, 6, 6), generator=gen(0))
    assert torch.isfinite(loss) and loss.item() > 0
    idx = loss_fn.last_indices
    drawn = idx["pool"][idx["negatives"]]                               # [A, R] flat pixel ids
    assert not bool(((drawn == idx["anchors"][:, None]) & idx["ok"]).any())
    if not replacement:
        srt = idx["negatives"].sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all())
    assert set(loss_fn.last_stats) >= {"margin", "pos_sim", "neg_sim", "temperature", "num_anchors",
                                       "num_negatives", "fnr"}


def test_zero_weight_pixels_never_drawn_and_cap():
    # anchor feature e0; pool: 5 copies of e0 (s_deb = 0) and 3 other pixels (s_deb > 0)
    e = torch.eye(3)
    y_pool = torch.cat([e[0].expand(5, 3), e[1:], F.normalize(e[0] + e[2], dim=0)[None]])
    for rep in (False, True):
        for seed in range(20):
            idx, ok = sample_negatives(e[:1].expand(4, 3), y_pool, 6, gen(seed), replacement=rep)
            assert idx.shape == (4, 6)
            assert bool((idx[ok] >= 5).all())                           # only positive-weight pixels
            if not rep:
                assert bool((ok.sum(dim=1) == 3).all())                 # R capped by the 3 candidates


def test_single_draw_follows_s_deb():
    # 2-d features at angles with 1 - cos = w: one draw is a categorical with p ~ w
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    th = torch.acos(1 - w)
    y_pool = torch.stack([th.cos(), th.sin()], dim=1)
    assert torch.allclose(debias_weights(torch.tensor([[1.0, 0.0]]), y_pool)[0], w, atol=1e-6)
    for rep in (False, True):
        idx, _ = sample_negatives(torch.tensor([[1.0, 0.0]]).expand(20000, 2), y_pool, 1, gen(0), replacement=rep)
        freq = torch.bincount(idx[:, 0], minlength=4).float() / 20000
        assert torch.allclose(freq, w / w.sum(), atol=0.015)


def test_valid_mask_excludes_padding():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 6, 8)
    mask, cls = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 3)
    valid = torch.zeros(2, 12, 16, dtype=torch.bool)                    # given at 2x resolution
    valid[:, :, :10] = True                                             # right 3 columns padded
    valid[1, 8:] = False                                                # bottom 2 rows of image 1
    loss_fn = PixelContrastiveLoss(num_negatives=50, sampler="fused")
    loss_fn(z, z, mask, cls, valid=valid, generator=gen(0))
    v = F.interpolate(valid[:, None].float(), size=(6, 8), mode="nearest").bool().flatten()
    idx = loss_fn.last_indices
    assert len(idx["anchors"]) == int(v.sum()) == loss_fn.last_stats["num_anchors"]
    assert bool(v[idx["anchors"]].all()) and bool(v[idx["pool"]].all())
    none = torch.zeros(2, 6, 8, dtype=torch.bool)
    zg = z.clone().requires_grad_(True)
    out = loss_fn(zg, z, mask, cls, valid=none)
    out.backward()                                                      # no valid pixel: 0, still differentiable
    assert out.item() == 0.0 and zg.grad is not None


def test_bilinear_resampling_matches_interpolate():
    torch.manual_seed(0)
    for src, dst in [((3, 5), (7, 9)), ((16, 20), (6, 7)), ((5, 5), (5, 5))]:
        mask, cls = torch.randn(2, 4, *src), torch.randn(2, 4, 3)
        H, W = dst
        flat = torch.arange(2 * H * W)
        y = sampler_features(mask, cls, flat // (H * W), flat % (H * W), dst, "mask")
        ref = F.normalize(F.interpolate(mask, size=dst, mode="bilinear", align_corners=False).softmax(1), dim=1)
        assert torch.allclose(y, ref.permute(0, 2, 3, 1).reshape(-1, 4), atol=1e-5)


def test_temperature_anneal():
    loss_fn = PixelContrastiveLoss(temperature_schedule=(0.3, 0.07), total_steps=100)
    assert loss_fn.current_temperature(0) == pytest.approx(0.3)
    assert loss_fn.current_temperature(50) == pytest.approx(0.185)
    assert loss_fn.current_temperature(100) == pytest.approx(0.07)
    assert loss_fn.current_temperature(500) == pytest.approx(0.07)
    assert PixelContrastiveLoss(temperature=0.1).current_temperature(7) == 0.1
    z = torch.randn(1, 4, 4, 4)
    mask, cls = confident_preds(quadrants(1, 4, 4))
    loss_fn(z, z, mask, cls, step=50)
    assert loss_fn.last_stats["temperature"] == pytest.approx(0.185)
    with pytest.raises(ValueError, match="step"):
        loss_fn(z, z, mask, cls)
    with pytest.raises(ValueError):
        PixelContrastiveLoss(temperature_schedule=(0.3, 0.07))
    with pytest.raises(ValueError):
        PixelContrastiveLoss(sampler="nope")


def test_large_input_stays_bounded():
    # 2 x 256 x 256 = 131072 pixels: an [N, N] float matrix would need 64 GiB
    g = gen(0)
    z = torch.randn(2, 128, 256, 256, generator=g)
    mask, cls = torch.randn(2, 100, 64, 64, generator=g), torch.randn(2, 100, 20, generator=g)
    loss_fn = PixelContrastiveLoss(max_anchors=256, max_pool=2048, timed=True)
    loss = loss_fn(z, z, mask, cls, instance_ids=torch.zeros(2, 256, 256, dtype=torch.long), generator=g)
    assert torch.isfinite(loss)
    st, idx = loss_fn.last_stats, loss_fn.last_indices
    assert st["num_anchors"] == 256 and st["pool_size"] == 2048 and st["num_negatives"] == 200
    assert idx["negatives"].shape == (256, 200)
    assert st["sampler_ms"] < 5000


@pytest.mark.parametrize("sampler", ["fused", "class", "mask"])
def test_runs_under_bf16_autocast_and_matches_fp32_sampling(sampler):
    """`amp: bf16` (the Cityscapes recipe) with the fused/class samplers used to die on the first
    distillation step: F_c's bf16 matmul was assigned into an fp32 buffer. The sampler now runs
    in fp32 with autocast off, so it draws the same negatives as in fp32."""
    g = gen(0)
    z = F.normalize(torch.randn(2, 8, 12, 12, generator=g), dim=1)
    mask, cls = torch.randn(2, 5, 6, 6, generator=g), torch.randn(2, 5, 4, generator=g)
    draws = {}
    for amp in (False, True):
        loss_fn = PixelContrastiveLoss(sampler=sampler, num_negatives=16, max_anchors=32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(z, z, mask, cls, generator=gen(1))
        assert torch.isfinite(loss)
        draws[amp] = loss_fn.last_indices["negatives"].sort(dim=1).values
    assert torch.equal(draws[False], draws[True])
