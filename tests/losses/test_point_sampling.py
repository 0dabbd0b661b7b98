"""castseg.losses.point_sampling on its own: the normalised point frame, bilinear/nearest
sampling with border padding, sampling boxes of valid regions, and Mask2Former's importance
sampling (which points it picks, how many, reproducibility, padding, empty inputs)."""

from __future__ import annotations

import math

import pytest
import torch

from castseg.losses.point_sampling import point_sample, region_bounds, uncertain_points, uniform_points


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    assert got.shape == want.shape and (got - want).abs().max() <= atol, (got - want).abs().max()


def _bilinear_by_hand(img: torch.Tensor, x: float, y: float) -> float:
    """One map ``[H, W]`` at normalised ``(x, y)``: pixel (i, j) has its centre at
    ``((j + .5) / W, (i + .5) / H)``; outside the centres the edge value is kept (border)."""
    h, w = img.shape
    u = min(max(x * w - 0.5, 0.0), w - 1.0)
    v = min(max(y * h - 0.5, 0.0), h - 1.0)
    j0, i0 = math.floor(u), math.floor(v)
    j1, i1 = min(j0 + 1, w - 1), min(i0 + 1, h - 1)
    a, b = u - j0, v - i0
    top = (1 - a) * float(img[i0, j0]) + a * float(img[i0, j1])
    bottom = (1 - a) * float(img[i1, j0]) + a * float(img[i1, j1])
    return (1 - b) * top + b * bottom


# --- point_sample ------------------------------------------------------------------------------


def test_point_sample_exact_values_on_a_2x2_map():
    v = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    pts = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75],  # pixel centres
                        [0.5, 0.25], [0.5, 0.5], [0.25, 0.5], [0.625, 0.375],   # between them
                        [0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.5]])        # corners / edges: border
    want = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5, 1.5, 1.0, 1.25, 0.0, 3.0, 1.0, 1.0]])
    assert torch.equal(point_sample(v, pts), want)
    # (x, y) order: x walks along the columns (1 step = +1), y along the rows (+2)
    assert point_sample(v, torch.tensor([[0.75, 0.25]])).item() == 1.0
    assert point_sample(v, torch.tensor([[0.25, 0.75]])).item() == 2.0


def test_point_sample_equals_bilinear_interpolation_by_hand():
    g = _gen(3)
    v = torch.randn(2, 5, 7, generator=g)
    pts = torch.rand(2, 40, 2, generator=g) * 1.2 - 0.1  # some outside [0,1]²: border padding
    got = point_sample(v, pts)
    want = torch.tensor([[_bilinear_by_hand(v[n], float(x), float(y)) for x, y in pts[n]] for n in range(2)])
    assert got.shape == (2, 40) and got.dtype == torch.float32
    _close(got, want, 1e-5)


def test_border_padding_keeps_edge_masks_uneroded():
    ones = torch.ones(1, 4, 6)
    edge = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [0.01, 0.99]])
    # zero padding would give 0.25 at the corners and 0.5 on the edges
    assert torch.equal(point_sample(ones, edge), torch.ones(1, 5))


def test_pixel_centres_recover_pixels_in_both_modes():
    g = _gen(1)
    v = torch.randn(3, 6, 10, generator=g)
    ii, jj = torch.meshgrid(torch.arange(6), torch.arange(10), indexing="ij")
    centres = torch.stack([(jj + 0.5) / 10, (ii + 0.5) / 6], -1).reshape(-1, 2)
    _close(point_sample(v, centres), v.reshape(3, -1), 1e-6)
    _close(point_sample(v, centres, mode="nearest"), v.reshape(3, -1), 0)


def test_nearest_mode_takes_the_pixel_containing_the_point():
    v = torch.arange(12.0).reshape(1, 3, 4)
    pts = torch.tensor([[0.01, 0.01], [0.49, 0.01], [0.51, 0.01], [0.99, 0.99], [0.3, 0.6]])
    # pixel (row, col): (0,0) (0,1) (0,2) (2,3) (1,1)
    assert point_sample(v, pts, mode="nearest").tolist() == [[0.0, 1.0, 2.0, 11.0, 5.0]]


def test_bool_masks_in_chunks_sample_like_their_float_copies():
    g = _gen(2)
    masks = torch.rand(70, 9, 11, generator=g) > 0.5  # > 32: converted to float in three chunks
    shared = torch.rand(25, 2, generator=g)
    own = torch.rand(70, 25, 2, generator=g)
    assert torch.equal(point_sample(masks, shared), point_sample(masks.float(), shared))
    assert torch.equal(point_sample(masks, own), point_sample(masks.float(), own))
    assert torch.equal(point_sample(masks, own, mode="nearest"), point_sample(masks.float(), own, mode="nearest"))
    # every mask got its own values (a chunking bug would repeat the first chunk)
    want = torch.tensor([[_bilinear_by_hand(masks[n].float(), float(x), float(y)) for x, y in own[n]]
                         for n in (0, 33, 69)])
    _close(point_sample(masks, own)[[0, 33, 69]], want, 1e-6)


def test_shared_points_and_a_single_map_broadcast():
    g = _gen(4)
    v = torch.randn(3, 5, 5, generator=g)
    pts = torch.rand(17, 2, generator=g)
    assert torch.equal(point_sample(v, pts), point_sample(v, pts.expand(3, -1, -1).contiguous()))
    one = v[:1]
    many = torch.rand(4, 17, 2, generator=g)
    out = point_sample(one, many)  # one map, four point sets
    assert out.shape == (4, 17)
    _close(out, point_sample(one.expand(4, -1, -1), many), 1e-6)


def test_gradients_flow_to_the_sampled_pixels():
    v = torch.zeros(1, 2, 2, requires_grad=True)
    point_sample(v, torch.tensor([[0.25, 0.25], [0.5, 0.5]])).sum().backward()
    # the first point is pixel (0,0); the second takes a quarter of each pixel
    assert torch.equal(v.grad, torch.tensor([[[1.25, 0.25], [0.25, 0.25]]]))


def test_point_sample_zero_maps():
    for dtype in (torch.float32, torch.bool):
        empty = torch.zeros(0, 8, 8, dtype=dtype)
        shared = point_sample(empty, torch.rand(5, 2))
        own = point_sample(empty, torch.rand(0, 5, 2))
        assert shared.shape == own.shape == (0, 5)
        assert shared.dtype == own.dtype == torch.float32


def test_point_sample_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"values must be \[N, H, W\], got \[4, 4\]"):
        point_sample(torch.zeros(4, 4), torch.rand(3, 2))
    with pytest.raises(ValueError, match="mode must be 'bilinear' or 'nearest', got 'bicubic'"):
        point_sample(torch.zeros(1, 4, 4), torch.rand(3, 2), mode="bicubic")
    with pytest.raises(ValueError, match="coords batch 2 does not match values batch 3"):
        point_sample(torch.zeros(3, 4, 4), torch.rand(2, 5, 2))


# --- region_bounds / uniform_points ------------------------------------------------------------


def test_region_bounds_of_none_boxes_other_shapes_and_empty():
    lo, hi, mask = region_bounds(None)
    assert lo.tolist() == [0.0, 0.0] and hi.tolist() == [1.0, 1.0] and mask is None
    valid = torch.zeros(16, 20, dtype=torch.bool)
    valid[:10, :12] = True  # the usual shape: right/bottom padding
    lo, hi, mask = region_bounds(valid)
    assert lo.tolist() == [0.0, 0.0] and hi.tolist() == pytest.approx([12 / 20, 10 / 16]) and mask is None
    inner = torch.zeros(16, 20, dtype=torch.bool)
    inner[2:6, 3:8] = True
    lo, hi, mask = region_bounds(inner)
    assert lo.tolist() == pytest.approx([3 / 20, 2 / 16]) and hi.tolist() == pytest.approx([8 / 20, 6 / 16])
    assert mask is None
    ell = valid.clone()
    ell[5:10, 6:12] = False  # not its bounding box: the region comes back for per-point weights
    lo, hi, mask = region_bounds(ell)
    assert hi.tolist() == pytest.approx([12 / 20, 10 / 16]) and mask is ell
    lo, hi, mask = region_bounds(torch.zeros(16, 20, dtype=torch.bool))
    assert lo.tolist() == [0.0, 0.0] and hi.tolist() == [1.0, 1.0]
    assert mask is not None and not mask.any()  # every point weighs 0


def test_uniform_points_in_the_box_reproducible_and_on_valid_pixels():
    valid = torch.zeros(16, 20, dtype=torch.bool)
    valid[3:11, 2:14] = True
    lo, hi, _ = region_bounds(valid)
    pts = uniform_points((2000,), lo, hi, generator=_gen(0))
    assert pts.shape == (2000, 2)
    assert (pts >= lo).all() and (pts <= hi).all()
    assert (point_sample(valid[None], pts, mode="nearest") == 1).all()  # no point wasted on padding
    # uniform: the box's quarters hold ~a quarter each
    mid = (lo + hi) / 2
    quarter = ((pts[:, 0] < mid[0]) & (pts[:, 1] < mid[1])).float().mean().item()
    assert abs(quarter - 0.25) < 0.04
    assert torch.equal(pts, uniform_points((2000,), lo, hi, generator=_gen(0)))
    assert not torch.equal(pts, uniform_points((2000,), lo, hi, generator=_gen(1)))
    per_mask = uniform_points((3, 50), torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.2, 0.0]])[:, None],
                              torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.3, 1.0]])[:, None], generator=_gen(0))
    assert per_mask.shape == (3, 50, 2)
    assert (per_mask[0] <= 0.5).all() and (per_mask[1] >= 0.5).all()
    assert ((per_mask[2, :, 0] >= 0.2) & (per_mask[2, :, 0] <= 0.3)).all()


# --- uncertain_points --------------------------------------------------------------------------


def _axis(m: int) -> torch.Tensor:
    """Which coordinate the uncertain half of mask i lies across: x (0) when i % 3 == 0, else y (1);
    a period prime to the 128-mask chunks, so a chunk reading another chunk's logits shows."""
    return torch.tensor([0 if i % 3 == 0 else 1 for i in range(m)])


def _half_uncertain(m: int, size: int = 16) -> torch.Tensor:
    """``[m, size, size]`` logits: 0 (most uncertain) on the left half (x-masks) or the top half
    (y-masks, see :func:`_axis`), 10 elsewhere."""
    logits = torch.full((m, size, size), 10.0)
    axis = _axis(m)
    logits[axis == 0, :, : size // 2] = 0.0
    logits[axis == 1, : size // 2, :] = 0.0
    return logits


def _in_uncertain_half(pts: torch.Tensor) -> torch.Tensor:
    """``[m, P]`` bool: the point's coordinate across the uncertain half is below 0.5 − ½ pixel (its
    bilinear neighbours are all uncertain pixels)."""
    axis = _axis(pts.shape[0])
    coord = pts.gather(2, axis[:, None, None].expand(-1, pts.shape[1], 1))[..., 0]
    return coord <= 7.5 / 16


def test_uncertain_points_pick_the_most_uncertain_region():
    logits = _half_uncertain(4)
    p, k, beta = 100, 3.0, 0.75
    pts = uncertain_points(logits, p, k, beta, torch.zeros(4, 2), torch.ones(4, 2), generator=_gen(0))
    assert pts.shape == (4, p, 2) and pts.dtype == torch.float32
    assert (pts >= 0).all() and (pts <= 1).all()
    inside = _in_uncertain_half(pts)
    n_imp = int(beta * p)
    # the 75 importance points come first and all lie where the logits are 0 (~140 of 300
    # candidates qualify); the 25 fresh uniform ones follow, about half of them in that half
    assert inside[:, :n_imp].all()
    assert (inside.float().mean(dim=1) >= beta).all()
    assert 0.2 < inside[:, n_imp:].float().mean() < 0.8
    # without importance sampling, only about half the points fall there
    plain = uncertain_points(logits, p, k, 0.0, torch.zeros(4, 2), torch.ones(4, 2), generator=_gen(0))
    assert plain.shape == (4, p, 2) and _in_uncertain_half(plain).float().mean() < 0.6


def test_uncertain_points_respect_each_masks_box():
    logits = torch.zeros(2, 8, 8)
    lo = torch.tensor([[0.0, 0.0], [0.5, 0.25]])
    hi = torch.tensor([[0.5, 1.0], [1.0, 0.5]])
    pts = uncertain_points(logits, 64, 2.0, 0.5, lo, hi, generator=_gen(0))
    assert ((pts >= lo[:, None]) & (pts <= hi[:, None])).all()
    # spread over each box, not stuck in a corner of it
    assert (pts.amax(1) - pts.amin(1) > 0.8 * (hi - lo)).all()


def test_uncertain_points_over_many_masks_are_per_mask():
    # 130 masks: two chunks of at most 128; every mask's points follow its own logits
    logits = _half_uncertain(130)
    pts = uncertain_points(logits, 20, 3.0, 0.75, torch.zeros(130, 2), torch.ones(130, 2), generator=_gen(0))
    assert pts.shape == (130, 20, 2)
    assert _in_uncertain_half(pts)[:, :15].all()


def test_uncertain_points_never_pick_padding():
    # padding (right half) has logits exactly 0, the image ±(distance to a boundary at x=0.25)
    x = (torch.arange(16) + 0.5) / 16
    logits = (20 * (x - 0.25)).expand(2, 16, 16).clone()
    logits[:, :, 8:] = 0.0
    valid = torch.zeros(16, 16, dtype=torch.bool)
    valid[:, :8] = True
    box = torch.zeros(2, 2), torch.ones(2, 2)
    blind = uncertain_points(logits, 60, 3.0, 0.75, *box, generator=_gen(0))
    assert (blind[:, :45, 0] >= 0.5).float().mean() > 0.9  # without the region: drawn to the padding
    pts = uncertain_points(logits, 60, 3.0, 0.75, *box, valid=[valid], image_of=torch.tensor([0, 0]),
                           generator=_gen(0))
    picked = pts[:, :45]
    assert (picked[..., 0] < 0.5).all()
    # ... and among the valid candidates it takes those near the image's own boundary
    assert ((picked[..., 0] - 0.25).abs() < 0.15).float().mean() > 0.9
    # a None region (every point valid) and masks of another image are left alone
    other = uncertain_points(logits, 60, 3.0, 0.75, *box, valid=[None, valid], image_of=torch.tensor([0, 0]),
                             generator=_gen(0))
    assert torch.equal(other, blind)


def test_uncertain_points_counts_and_ratios():
    logits = _half_uncertain(2)
    box = torch.zeros(2, 2), torch.ones(2, 2)
    for p, k, beta in ((10, 3.0, 0.75), (9, 4.0, 1.0), (12, 2.0, 0.5)):
        pts = uncertain_points(logits, p, k, beta, *box, generator=_gen(0))
        assert pts.shape == (2, p, 2)
        assert _in_uncertain_half(pts)[:, :int(beta * p)].all(), (p, k, beta)
    # beta = 1: every point is an importance point
    assert _in_uncertain_half(uncertain_points(logits, 9, 4.0, 1.0, *box, generator=_gen(3))).all()
    # k < 1 still draws P candidates (then all of them are kept)
    assert uncertain_points(logits, 7, 0.5, 1.0, *box, generator=_gen(0)).shape == (2, 7, 2)


def test_uncertain_points_reproducible_with_a_generator_and_no_gradient():
    logits = torch.randn(3, 8, 8, generator=_gen(0), requires_grad=True)
    box = torch.zeros(3, 2), torch.ones(3, 2)
    a = uncertain_points(logits, 32, 3.0, 0.75, *box, generator=_gen(5))
    b = uncertain_points(logits, 32, 3.0, 0.75, *box, generator=_gen(5))
    c = uncertain_points(logits, 32, 3.0, 0.75, *box, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not a.requires_grad


def test_uncertain_points_zero_masks():
    pts = uncertain_points(torch.zeros(0, 8, 8), 16, 3.0, 0.75, torch.zeros(0, 2), torch.ones(0, 2),
                           generator=_gen(0))
    assert pts.shape == (0, 16, 2) and pts.dtype == torch.float32
