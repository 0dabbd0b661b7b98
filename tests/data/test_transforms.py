"""Weak/strong views: geometry moves image and masks together; the strong view moves nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from castseg.data.transforms import Resize, StrongView, WeakView, hsv_to_rgb, resample, rgb_to_hsv

RED, GREEN, BLUE = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])


def coloured_sample(h: int = 40, w: int = 56) -> dict:
    """Grey background; object 0 a red rectangle, object 1 a green one, object 2 a blue corner dot."""
    img = torch.full((3, h, w), 0.5)
    masks = torch.zeros((3, h, w), dtype=torch.bool)
    masks[0, 5:20, 4:25] = True
    masks[1, 22:36, 30:50] = True
    masks[2, 0:3, w - 3:w] = True
    for m, c in zip(masks, (RED, GREEN, BLUE)):
        img[:, m] = c[:, None]
    return {"image": img, "masks": masks, "labels": torch.tensor([0, 1, 2]),
            "ignore": torch.zeros((h, w), dtype=torch.bool)}


def coord_sample(h: int = 30, w: int = 50) -> dict:
    """Pixel (y, x) has colour (x/W, y/H, 0.25): every pixel identifies its source position."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([xs / w, ys / h, torch.full((h, w), 0.25)]).float()
    masks = torch.stack([(ys // 5 + xs // 7) % 3 == k for k in range(3)])
    return {"image": img, "masks": masks, "labels": torch.arange(3)}


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood is all in ``mask`` (away from bilinear-blended edges)."""
    return -F.max_pool2d(-mask[None, None].float(), 3, 1, 1)[0, 0] > 0.5


def assert_masks_on_their_colour(out: dict, colours=(RED, GREEN, BLUE), tol: float = 0.02):
    for m, lab in zip(out["masks"], out["labels"]):
        inner = interior(m)
        if inner.any():
            px = out["image"][:, inner]
            assert (px - colours[int(lab)][:, None]).abs().max() < tol


def test_unit_scale_crop_flip_is_exact_pixel_move():
    s = coord_sample()
    for seed in range(10):
        view = WeakView(crop_size=(16, 20), scale_range=(1, 1), hflip=0.5, vflip=0.5)
        out = view(s, torch.Generator().manual_seed(seed))
        assert out["image"].shape == (3, 16, 20) and out["masks"].shape[1:] == (16, 20)
        # Decode the source position of every output pixel from its colour...
        x = torch.round(out["image"][0] * 50).long()
        y = torch.round(out["image"][1] * 30).long()
        # ...which must be a crop + flip, and the masks must be the source masks at that position.
        assert ((x[:, 1:] - x[:, :-1]).abs() == 1).all() and ((y[1:] - y[:-1]).abs() == 1).all()
        src = s["masks"][:, y, x]
        kept = s["masks"][:, y, x].flatten(1).any(1)
        assert torch.equal(out["masks"], src[kept]) and torch.equal(out["labels"], s["labels"][kept])


@pytest.mark.parametrize("seed", range(8))
def test_random_scale_crop_keeps_masks_on_object_colour(seed):
    out = WeakView(crop_size=(32, 32), scale_range=(0.5, 2.0), hflip=0.5, vflip=0.5)(
        coloured_sample(), torch.Generator().manual_seed(seed))
    assert out["image"].shape == (3, 32, 32) and out["valid"].shape == (32, 32)
    assert out["masks"].dtype == torch.bool and len(out["masks"]) == len(out["labels"])
    assert_masks_on_their_colour(out)


def test_padding_is_marked_invalid_and_zero():
    out = WeakView(crop_size=(64, 64), scale_range=(1, 1), hflip=0)(coloured_sample(40, 56))
    assert out["valid"][:40, :56].all() and not out["valid"][40:].any() and not out["valid"][:, 56:].any()
    assert (out["image"][:, ~out["valid"]] == 0).all()
    assert not out["masks"][:, ~out["valid"]].any() and not out["ignore"][~out["valid"]].any()
    assert torch.equal(out["image"][:, :40, :56], coloured_sample()["image"])


def test_instances_leaving_the_crop_are_dropped():
    s = coloured_sample()
    # Crop the top-left 10x10 at scale 1: only the red object (label 0) is in it.
    out = resample(s, (40, 56), window=(0, 0, 10, 10))
    assert out["labels"].tolist() == [0] and out["masks"].shape == (1, 10, 10)


def test_resize_is_deterministic():
    s = coloured_sample(40, 56)
    out = Resize(short_side=20)(s)
    assert out["image"].shape == (3, 20, 28) and out["masks"].shape == (3, 20, 28)
    assert torch.equal(out["image"], Resize(short_side=20)(s)["image"])
    assert Resize(short_side=80, max_size=100)(s)["image"].shape == (3, 71, 100)
    assert torch.equal(Resize()(s)["image"], s["image"])
    assert_masks_on_their_colour(out, tol=0.05)


def test_weak_view_reproducible_under_manual_seed():
    s = coloured_sample()
    view = WeakView(crop_size=(24, 24))
    torch.manual_seed(7)
    a = view(s)
    torch.manual_seed(7)
    b = view(s)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])


def test_weak_view_invert_and_tint_recolour_only_real_pixels():
    s = coloured_sample(40, 56)
    s["image"][:] = 0.25  # grey
    g = torch.Generator().manual_seed(0)
    views = [WeakView(crop_size=(64, 64), scale_range=(1, 1), hflip=0, invert=1.0, tint=0.4)(s, g) for _ in range(8)]
    for out in views:
        real = out["image"][:, out["valid"]]
        assert (out["image"][:, ~out["valid"]] == 0).all()  # padding stays 0, never inverted to 1
        gains = real[:, 0] / 0.75  # inverted grey 0.75 times a gain per channel, same on every pixel
        assert (gains >= 0.6 - 1e-6).all() and (gains <= 1.4 + 1e-6).all()
        assert torch.allclose(real, (0.75 * gains)[:, None].clamp(max=1), atol=1e-6)
    assert len({tuple(v["image"][:, 0, 0].tolist()) for v in views}) == 8  # grey became coloured
    plain = WeakView(crop_size=(64, 64), scale_range=(1, 1), hflip=0)(s)
    assert torch.equal(plain["image"][:, :40, :56], s["image"])  # off by default
    with pytest.raises(ValueError, match="invert"):
        WeakView(invert=1.5)


def test_strong_view_identity_is_exact():
    img = torch.rand(3, 17, 23)
    assert torch.equal(StrongView.identity()(img), img)


def test_strong_view_keeps_shape_range_and_padding():
    img = torch.rand(3, 20, 24)
    valid = torch.ones(20, 24, dtype=torch.bool)
    valid[15:] = False
    img[:, ~valid] = 0
    for seed in range(10):
        out = StrongView()(img, valid, generator=torch.Generator().manual_seed(seed))
        assert out.shape == img.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1 and (out[:, ~valid] == 0).all()
    assert not torch.equal(StrongView(jitter_p=1)(img, generator=torch.Generator().manual_seed(0)), img)


def test_strong_view_never_moves_pixels():
    g = torch.Generator().manual_seed(0)
    # Per-pixel random black/white pattern, no blur: every photometric op maps black and white
    # to two fixed values, so the pattern must survive pixel for pixel.
    bits = torch.rand(48, 48, generator=g) > 0.5
    img = bits.float()[None].expand(3, -1, -1).clone()
    for seed in range(20):
        out = StrongView(blur_p=0, jitter_p=1)(img, generator=torch.Generator().manual_seed(seed))
        lum = out.mean(0)
        assert lum[bits].min() == lum[bits].max() and lum[~bits].min() == lum[~bits].max(), seed
        assert lum[bits].min() > lum[~bits].max(), seed
    # With blur (σ ≤ 2) on 6x6 blocks: thresholding still recovers the blocks, shifted by nothing.
    blocks = (torch.rand(8, 8, generator=g) > 0.5).repeat_interleave(6, 0).repeat_interleave(6, 1)
    img = blocks.float()[None].expand(3, -1, -1).clone()
    for seed in range(20):
        lum = StrongView(blur_p=1, jitter_p=1)(img, generator=torch.Generator().manual_seed(seed)).mean(0)
        thr = (lum[blocks].mean() + lum[~blocks].mean()) / 2
        agree = ((lum > thr) == blocks).float().mean()
        shifted = ((lum[:, 1:] > thr) == blocks[:, :-1]).float().mean()
        assert agree > 0.9 and agree > shifted + 0.05, (seed, agree, shifted)


def test_hsv_round_trip_and_hue_rotation():
    img = torch.rand(3, 16, 16)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(img)), img, atol=1e-5)
    red = RED[:, None, None].expand(3, 2, 2)
    hsv = rgb_to_hsv(red)
    green = hsv_to_rgb(torch.stack([hsv[0] + 1 / 3, hsv[1], hsv[2]]))
    assert torch.allclose(green, GREEN[:, None, None].expand(3, 2, 2), atol=1e-6)


def test_strong_view_reproducible():
    img = torch.rand(3, 12, 12)
    torch.manual_seed(3)
    a = StrongView()(img)
    torch.manual_seed(3)
    assert torch.equal(a, StrongView()(img))


@pytest.mark.parametrize("bright_nuclei", [True, False])
def test_stain_map_colours_nuclei_like_he_for_either_polarity(bright_nuclei):
    from castseg.data.transforms import HE_BACKGROUND, HE_NUCLEUS, stain_map

    grey = torch.full((40, 40), 0.1)
    grey[5:15, 5:15] = 0.9  # a "nucleus": a quarter of the image at most, as in nuclei crops
    img = (grey if bright_nuclei else 1 - grey).expand(3, -1, -1).clone()
    out = stain_map(img, None, torch.Generator().manual_seed(0))
    nucleus, background = out[:, 10, 10], out[:, 30, 30]
    assert (nucleus - torch.tensor(HE_NUCLEUS)).abs().max() < 0.13  # within the colour jitter
    assert (background - torch.tensor(HE_BACKGROUND)).abs().max() < 0.09
    assert background.mean() > nucleus.mean() + 0.1  # dark purple nuclei on a pale ground


def test_weak_view_stain_option_changes_only_colours():
    from castseg.data.transforms import WeakView

    torch.manual_seed(0)
    img = torch.rand(3, 32, 32).mean(0, keepdim=True).expand(3, -1, -1).clone()
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True
    sample = {"image": img, "masks": masks, "labels": torch.tensor([0])}
    plain = WeakView(crop_size=None, scale_range=(1, 1), hflip=0)(sample, torch.Generator().manual_seed(3))
    stained = WeakView(crop_size=None, scale_range=(1, 1), hflip=0, stain=1.0)(sample, torch.Generator().manual_seed(3))
    assert torch.equal(plain["masks"], stained["masks"])
    assert not torch.allclose(stained["image"][0], stained["image"][1])  # grey became colour
    with pytest.raises(ValueError, match="stain"):
        WeakView(stain=1.5)
