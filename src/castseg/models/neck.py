"""Necks: turn encoder maps into a stride 32/16/8 pyramid for the decoder + stride-4 mask features.

Geometry. The student pads its input to ``(Hp, Wp)``, multiples of 32, so strides 4..32 are exact
grids. A ViT's token grid has stride 14 (not a power of 2) and covers ``14*ceil(Hp/14) >= Hp``
pixels from the top-left corner. Every grid here is anchored at the top-left corner (cell i
covers ``[i*s, (i+1)*s)``), so :func:`resample` can move a map between strides with one bilinear
resize by ``s_in/s_out`` followed by a crop: no drift across the image, unlike resizing the
whole map to the target size.

Both necks take ``feats``: 4 maps ``[B, C_i, h_i, w_i]`` (fine to coarse for CNNs; four layers of
the same token grid for ViTs), and return ``(multi_scale, mask_features)``:
``multi_scale`` = 3 maps ``[B, hidden_dim, Hp/s, Wp/s]`` for s = 32, 16, 8 (decoder order) and
``mask_features`` ``[B, mask_dim, Hp/4, Wp/4]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGET_STRIDES = (4, 8, 16, 32)


def resample(x: torch.Tensor, in_stride: float, out_stride: float, size: tuple[int, int]) -> torch.Tensor:
    """Move ``x`` ``[B,C,h,w]`` from a grid of stride ``in_stride`` to one of ``out_stride`` and
    shape ``size``, both anchored at the top-left pixel. Bilinear; pads by replication if the
    source covers less than the target (odd CNN sizes)."""
    if in_stride != out_stride:
        # recompute_scale_factor=False: sample positions follow the exact stride ratio, not
        # the rounded output size. Ratios here (14/4, 3.5/4, 14/32...) are exact in binary.
        x = F.interpolate(x, scale_factor=float(in_stride) / float(out_stride), mode="bilinear",
                          align_corners=False, recompute_scale_factor=False)
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh > 0 or dw > 0:
        x = F.pad(x, (0, max(dw, 0), 0, max(dh, 0)), mode="replicate")
    return x[..., : size[0], : size[1]]


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)


def _target_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    return [(size[0] // s, size[1] // s) for s in TARGET_STRIDES]


class _Halve(nn.Module):
    """Learned 2x downsampling aligned with the grid: a 2x2/stride-2 conv merges cells (2j, 2j+1)
    into cell j (a 3x3/stride-2/pad-1 conv would shift the grid by a quarter cell). Odd sizes
    get one zero row/column so no input cell is dropped."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)))


def _reassemble_op(c: int, ratio: float) -> tuple[nn.Module, float]:
    """Learned resampling for DPT's reassemble step; returns (op, factor it changes the stride by)."""
    if ratio >= 3:  # e.g. stride 14 -> 3.5, then a small bilinear step to 4
        return nn.ConvTranspose2d(c, c, kernel_size=4, stride=4), 0.25
    if ratio >= 1.5:
        return nn.ConvTranspose2d(c, c, kernel_size=2, stride=2), 0.5
    if ratio > 0.75:
        return nn.Identity(), 1.0
    return _Halve(c), 2.0


class ResidualConvUnit(nn.Module):
    """DPT's pre-activation residual block: x + conv(relu(conv(relu(x)))), shape-preserving."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT fusion: refine the lateral map, add the (already upsampled) coarser path, refine, mix."""

    def __init__(self, c: int):
        super().__init__()
        self.lateral = ResidualConvUnit(c)
        self.refine = ResidualConvUnit(c)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, lateral: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        x = self.lateral(lateral)
        if top is not None:
            x = x + top
        return self.out(self.refine(x))


class DPTNeck(nn.Module):
    """DPT-style neck: reassemble (1x1 projection + learned up/down-sampling + exact bilinear
    step to strides 4/8/16/32) then top-down fusion with residual conv units.

    Args: ``in_channels``/``in_strides`` of the 4 encoder maps; ``reassemble_dims``: widths after
    the 1x1 projections (default ``C/8, C/4, C/2, C`` of the widest map, Depth-Anything-like);
    ``hidden_dim``: pyramid width; ``mask_dim``: width of the stride-4 mask features.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[float], hidden_dim: int = 256,
                 mask_dim: int = 256, reassemble_dims: Sequence[int] | None = None):
        super().__init__()
        if len(in_channels) != 4 or len(in_strides) != 4:
            raise ValueError(f"DPTNeck needs 4 encoder maps, got {len(in_channels)}")
        cmax = max(in_channels)
        dims = list(reassemble_dims) if reassemble_dims else [max(cmax // 8, 8), max(cmax // 4, 8),
                                                              max(cmax // 2, 8), cmax]
        self.in_strides = [float(s) for s in in_strides]
        self.project = nn.ModuleList(nn.Conv2d(c, d, 1) for c, d in zip(in_channels, dims))
        ops = [_reassemble_op(d, s / t) for d, s, t in zip(dims, self.in_strides, TARGET_STRIDES)]
        self.resize = nn.ModuleList(op for op, _ in ops)
        self.mid_strides = [s * f for s, (_, f) in zip(self.in_strides, ops)]
        # DPT's "layer_rn": bring every level to the common width (no bias: a norm-free sum follows).
        self.to_hidden = nn.ModuleList(nn.Conv2d(d, hidden_dim, 3, padding=1, bias=False) for d in dims)
        self.fuse = nn.ModuleList(FusionBlock(hidden_dim) for _ in dims)
        self.mask_proj = nn.Conv2d(hidden_dim, mask_dim, 1)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        sizes = _target_sizes(size)
        levels = []
        for i, x in enumerate(feats):
            x = self.resize[i](self.project[i](x))
            x = resample(x, self.mid_strides[i], TARGET_STRIDES[i], sizes[i])
            levels.append(self.to_hidden[i](x))
        outs: list[torch.Tensor] = [levels[3]] * 4
        top = None
        for i in (3, 2, 1, 0):  # coarse to fine
            outs[i] = self.fuse[i](levels[i], top)
            if i > 0:
                top = F.interpolate(outs[i], size=sizes[i - 1], mode="bilinear", align_corners=False)
        return [outs[3], outs[2], outs[1]], self.mask_proj(outs[0])


class FPNNeck(nn.Module):
    """FPN neck (ablation): 1x1 lateral convs, fixed bilinear resampling to strides 4/8/16/32
    (for a ViT this is a "simple feature pyramid" without learned up/down-sampling), top-down sum,
    3x3 output convs. Same inputs/outputs as :class:`DPTNeck`."""

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[float], hidden_dim: int = 256,
                 mask_dim: int = 256):
        super().__init__()
        if len(in_channels) != 4 or len(in_strides) != 4:
            raise ValueError(f"FPNNeck needs 4 encoder maps, got {len(in_channels)}")
        self.in_strides = [float(s) for s in in_strides]
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), _gn(hidden_dim))
                                     for c in in_channels)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False), _gn(hidden_dim), nn.ReLU())
            for _ in in_channels)
        self.mask_proj = nn.Conv2d(hidden_dim, mask_dim, 1)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        sizes = _target_sizes(size)
        outs: list[torch.Tensor] = [feats[0]] * 4
        top = None
        for i in (3, 2, 1, 0):
            x = resample(self.lateral[i](feats[i]), self.in_strides[i], TARGET_STRIDES[i], sizes[i])
            if top is not None:
                x = x + F.interpolate(top, size=sizes[i], mode="bilinear", align_corners=False)
            top = x
            outs[i] = self.output[i](x)
        return [outs[3], outs[2], outs[1]], self.mask_proj(outs[0])


def build_neck(kind: str, in_channels: Sequence[int], in_strides: Sequence[float], hidden_dim: int = 256,
               mask_dim: int = 256, reassemble_dims: Sequence[int] | None = None) -> nn.Module:
    if kind == "dpt":
        return DPTNeck(in_channels, in_strides, hidden_dim, mask_dim, reassemble_dims)
    if kind == "fpn":
        return FPNNeck(in_channels, in_strides, hidden_dim, mask_dim)
    raise ValueError(f"neck must be 'dpt' or 'fpn', got {kind!r}")
