"""Weak (geometric) and strong (photometric-only) views, and a deterministic eval resize.

A *sample* is a dict with ``"image"`` float32 ``[3,H,W]`` in [0,1] and optionally ``"masks"``
bool ``[N,H,W]``, ``"labels"`` int64 ``[N]``, ``"ignore"`` bool ``[H,W]`` (crowd regions) and
``"valid"`` bool ``[H,W]`` (real image pixels, False on padding). Geometric transforms move all
of them with one index map, so they stay pixel-aligned by construction.

The strong view (METHOD.md, L_pxl) is the weak view plus photometric changes only: it never
moves a pixel, so pixel p is the same place in both views.

Randomness comes from the ``generator`` argument, else torch's global RNG: DataLoader workers
get distinct torch seeds, and ``torch.manual_seed`` makes ``num_workers=0`` runs reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Sample = dict[str, Any]


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _chance(p: float, g: torch.Generator | None) -> bool:
    # Always draw, so the RNG stream does not depend on which options are switched on.
    return float(torch.rand((), generator=g)) < p


def _axis_map(size_in: int, size_out: int, start: int, length: int, flip: bool):
    """For output positions ``start..start+length`` of an axis resized ``size_in → size_out``:
    position in the resized frame, nearest source index, bilinear (i0, i1, w) and an
    ``inside`` flag (False on padding).
    Pixel-centre convention of ``F.interpolate(align_corners=False)``."""
    pos = torch.arange(start, start + length)
    if flip:
        pos = pos.flip(0)
    inside = pos < size_out
    scale = size_in / size_out
    centre = (pos.double() + 0.5) * scale
    nearest = centre.floor().long().clamp(0, size_in - 1)
    src = (centre - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(0, size_in - 1)
    i1 = (i0 + 1).clamp(max=size_in - 1)
    w = (src - i0.double()).clamp(0, 1).float()
    return pos, nearest, i0, i1, w, inside


def resample(sample: Sample, out_hw: tuple[int, int], window: tuple[int, int, int, int] | None = None,
             hflip: bool = False, vflip: bool = False) -> Sample:
    """Resize ``sample`` to ``out_hw``, cut ``window = (y0, x0, h, w)`` from the resized frame
    (rows/cols beyond it are zero padding, ``valid`` False), then flip. Only the window is
    computed, so large upscales cost the crop size, not the resized size. Downscaling the image
    uses an antialiased resize (it is then no bigger than the input); masks are nearest-neighbour.
    Instances with no pixel left are dropped."""
    img = sample["image"]
    H, W = img.shape[-2:]
    oh, ow = out_hw
    y0, x0, ch, cw = window if window is not None else (0, 0, oh, ow)
    py, ny, ay0, ay1, wy, in_y = _axis_map(H, oh, y0, ch, vflip)
    px, nx, ax0, ax1, wx, in_x = _axis_map(W, ow, x0, cw, hflip)
    inside = in_y[:, None] & in_x[None, :]

    if oh < H or ow < W:
        # Antialias matters when shrinking; the shrunk image is no larger than the input.
        small = F.interpolate(img[None], size=(oh, ow), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        out_img = small[:, py.clamp(max=oh - 1)][:, :, px.clamp(max=ow - 1)]
    else:
        # Separable bilinear gather of the window only (= F.interpolate without antialias).
        rows = img[:, ay0] * (1 - wy)[None, :, None] + img[:, ay1] * wy[None, :, None]
        out_img = rows[:, :, ax0] * (1 - wx)[None, None, :] + rows[:, :, ax1] * wx[None, None, :]
    out = dict(sample)
    out["image"] = out_img * inside
    for key in ("ignore", "valid"):
        if key in sample:
            out[key] = sample[key][ny][:, nx] & inside
    if "valid" not in sample:
        out["valid"] = inside.clone()
    if "masks" in sample:
        masks = sample["masks"][:, ny][:, :, nx] & inside
        keep = masks.flatten(1).any(1)
        out["masks"] = masks[keep]
        for key in ("labels", "ann_ids"):
            if key in sample:
                out[key] = sample[key][keep]
    return out


class WeakView:
    """Random resize (scale ~ U[scale_range] of the input size), random crop to ``crop_size``
    ``(h, w)`` (zero-padded bottom/right where the resized image is smaller; ``valid`` marks real
    pixels), horizontal/vertical flip. Output image ``[3,h,w]``, masks ``[N',h,w]`` with
    instances that left the crop dropped. ``crop_size=None`` keeps the whole resized image.

    Photometric options for training on one modality a model must later meet in another (the
    demo's stand-ins: grey fluorescence → colour histology): ``invert`` is the chance of
    ``1 - image`` (bright-on-dark ↔ dark-on-bright), ``tint`` scales each channel by a gain in
    ``[1 - tint, 1 + tint]`` (grey → coloured), ``stain`` is the chance of an H&E-like colour
    map (:func:`stain_map`). Padding stays 0."""

    def __init__(self, crop_size: tuple[int, int] | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                 hflip: float = 0.5, vflip: float = 0.0, invert: float = 0.0, tint: float = 0.0,
                 stain: float = 0.0):
        if not (0 < scale_range[0] <= scale_range[1]):
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        if not (0 <= invert <= 1 and 0 <= tint < 1 and 0 <= stain <= 1):
            raise ValueError(f"invert and stain must be in [0, 1] and tint in [0, 1), got {invert}, {stain}, {tint}")
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.scale_range = scale_range
        self.hflip, self.vflip = hflip, vflip
        self.invert, self.tint, self.stain = invert, tint, stain

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        H, W = sample["image"].shape[-2:]
        s = _uniform(*self.scale_range, generator)
        oh, ow = max(1, round(H * s)), max(1, round(W * s))
        if self.crop_size is None:
            window = (0, 0, oh, ow)
        else:
            ch, cw = self.crop_size
            y0 = int(torch.randint(0, max(oh - ch, 0) + 1, (), generator=generator))
            x0 = int(torch.randint(0, max(ow - cw, 0) + 1, (), generator=generator))
            window = (y0, x0, ch, cw)
        hf, vf = _chance(self.hflip, generator), _chance(self.vflip, generator)
        out = resample(sample, (oh, ow), window, hflip=hf, vflip=vf)
        if self.invert > 0 or self.tint > 0 or self.stain > 0:  # extra draws only when on: older runs keep their crops
            out["image"] = self._photometric(out["image"], out.get("valid"), generator)
        return out

    def _photometric(self, img: torch.Tensor, valid: torch.Tensor | None,
                     g: torch.Generator | None) -> torch.Tensor:
        """``img`` ``[3,h,w]`` in [0,1]; ``valid`` ``[h,w]`` bool (False = padding)."""
        if self.stain > 0 and _chance(self.stain, g):
            img = stain_map(img, valid, g)
        elif _chance(self.invert, g):
            img = 1 - img
        gains = 1 + self.tint * (2 * torch.rand(3, generator=g) - 1)
        img = (img * gains.to(img.dtype)[:, None, None]).clamp(0, 1)
        return img * valid.to(img.dtype) if valid is not None else img


# Mean RGB of nuclei and of background in the embedded H&E set (30 images, from its masks):
# hematoxylin-purple on a pale pink-lavender ground.
HE_NUCLEUS = (0.51, 0.32, 0.73)
HE_BACKGROUND = (0.73, 0.66, 0.80)


def stain_map(img: torch.Tensor, valid: torch.Tensor | None, g: torch.Generator | None) -> torch.Tensor:
    """Re-colour ``img`` ``[3,h,w]`` like an H&E slide, for either polarity of the input.

    Background is the majority of a nuclei image in both grey modalities (dark in fluorescence,
    bright in brightfield), so a pixel's distance from the median intensity says how nucleus-like
    it is; that distance (robustly scaled, random gamma) blends a jittered background colour into
    a jittered nucleus colour."""
    grey = img.mean(0)
    ref = grey[valid] if valid is not None and bool(valid.any()) else grey.flatten()
    med = ref.median()
    dev = (grey - med).abs()
    scale = torch.quantile((ref - med).abs().float(), 0.995).clamp_min(1e-3)
    t = (dev / scale).clamp(0, 1) ** _uniform(0.6, 1.6, g)
    jitter = lambda c, a: torch.tensor(c) + a * (2 * torch.rand(3, generator=g) - 1)  # noqa: E731
    nucleus, background = jitter(HE_NUCLEUS, 0.12), jitter(HE_BACKGROUND, 0.08)
    out = background[:, None, None] + t[None] * (nucleus - background)[:, None, None]
    return out.to(img.dtype).clamp(0, 1)


class Resize:
    """Deterministic eval resize: shorter side to ``short_side`` and/or longer side at most
    ``max_size`` (aspect kept). Neither given → identity."""

    def __init__(self, short_side: int | None = None, max_size: int | None = None):
        self.short_side, self.max_size = short_side, max_size

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        H, W = sample["image"].shape[-2:]
        s = 1.0
        if self.short_side:
            s = self.short_side / min(H, W)
        if self.max_size and max(H, W) * s > self.max_size:
            s = self.max_size / max(H, W)
        return resample(sample, (max(1, round(H * s)), max(1, round(W * s))))


# --- photometric ----------------------------------------------------------------------------

def _gray(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``[1,H,W]`` of ``[3,H,W]``."""
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """``[3,H,W]`` RGB in [0,1] → HSV, all channels in [0,1]."""
    r, g, b = img
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h % 1.0, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    h6 = (h % 1.0) * 6
    i = h6.floor().long() % 6
    f = h6 - h6.floor()
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # Sector i → (r, g, b) picked from (v, t, p, q): the standard six-sector table.
    table = torch.stack([torch.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table.gather(0, i[None, None].expand(1, 3, *i.shape))[0]


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius ceil(3σ), replicate padding (any image size)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = img.shape[0]
    out = F.pad(img[None], (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


class StrongView:
    """Photometric-only augmentation of an image ``[3,H,W]`` in [0,1]; same shape out, no pixel
    moves. Colour jitter (``brightness``/``contrast``/``saturation`` factors in [1-x, 1+x], hue
    shift in [-hue, hue] turns, in random order) with probability ``jitter_p``; grayscale with
    ``grayscale_p``; Gaussian blur σ ~ U[blur_sigma] with ``blur_p``. Values from METHOD.md; the
    probabilities 0.8 / 0.5 (not stated there) follow the MoCo-v2 recipe those values come from.
    Padding (``valid`` False) stays 0 and is left out of the contrast mean."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0),
                 blur_p: float = 0.5):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.blur_sigma, self.blur_p = blur_sigma, blur_p

    @classmethod
    def identity(cls) -> "StrongView":
        return cls(0, 0, 0, 0, jitter_p=0, grayscale_p=0, blur_p=0)

    def __call__(self, image: torch.Tensor, valid: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator
        img = image
        if _chance(self.jitter_p, g):
            order = torch.randperm(4, generator=g).tolist()
            factors = [_uniform(max(0.0, 1 - x), 1 + x, g) for x in (self.brightness, self.contrast, self.saturation)]
            shift = _uniform(-self.hue, self.hue, g)
            for op in order:
                if op == 0 and self.brightness > 0:
                    img = (img * factors[0]).clamp(0, 1)
                elif op == 1 and self.contrast > 0:
                    gray = _gray(img)
                    mean = gray[valid[None]].mean() if valid is not None and valid.any() else gray.mean()
                    img = (img * factors[1] + mean * (1 - factors[1])).clamp(0, 1)
                elif op == 2 and self.saturation > 0:
                    img = (img * factors[2] + _gray(img) * (1 - factors[2])).clamp(0, 1)
                elif op == 3 and self.hue > 0:
                    hsv = rgb_to_hsv(img)
                    img = hsv_to_rgb(torch.stack([hsv[0] + shift, hsv[1], hsv[2]])).clamp(0, 1)
        if _chance(self.grayscale_p, g):
            img = _gray(img).expand(3, -1, -1).clone()
        do_blur = _chance(self.blur_p, g)
        sigma = _uniform(*self.blur_sigma, g)
        if do_blur and sigma > 0:
            img = _blur(img, sigma)
        if img is image:
            return image.clone()  # the caller may modify one view in place
        return img * valid if valid is not None else img
