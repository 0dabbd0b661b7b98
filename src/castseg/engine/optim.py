"""Optimizer, learning-rate schedule and mixed precision from a :class:`~castseg.config.TrainConfig`."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterable

import torch
import torch.nn as nn

from castseg.config import TrainConfig
from castseg.errors import CastsegError
from castseg.models.student import param_groups as student_param_groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, param_groups: Iterable[Any] | None = None
                    ) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (the caller's), else the student's recipe: parameters whose
    name starts with ``encoder.`` at ``lr × backbone_lr_mult``, norms/biases/embeddings without
    weight decay (:func:`castseg.models.student.param_groups`, which works for any module)."""
    if param_groups is None:
        param_groups = student_param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    groups = list(param_groups)
    if not groups:
        raise ValueError("nothing to optimize: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of each group's base lr for optimizer step ``step`` (0-based).

    Main schedule over ``[0, max_steps)``: poly ``(1 - step/max_steps) ** poly_power``, cosine
    ``(1 + cos(pi·step/max_steps)) / 2``, or constant 1; times the linear warm-up
    ``(step + 1) / warmup_steps`` while ``step < warmup_steps``.
    """
    progress = min(max(step, 0), cfg.max_steps) / cfg.max_steps
    if cfg.schedule == "poly":
        main = (1.0 - progress) ** cfg.poly_power
    elif cfg.schedule == "cosine":
        main = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        main = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        main *= (step + 1) / cfg.warmup_steps
    return main


class _Schedule:
    """The LambdaLR multiplier as a plain object: LambdaLR.state_dict() then holds its (JSON-able)
    fields instead of skipping a lambda, and a checkpoint round-trips without pickle."""

    def __init__(self, cfg: TrainConfig):
        self.max_steps, self.schedule, self.poly_power, self.warmup_steps = (
            cfg.max_steps, cfg.schedule, cfg.poly_power, cfg.warmup_steps)

    def __call__(self, step: int) -> float:
        return lr_factor(step, self)  # type: ignore[arg-type]  (duck-typed: same field names)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimizer step with :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg))


def set_cuda_math(device: torch.device, tf32: bool = True, fixed_shapes: bool = False) -> None:
    """On CUDA: TF32 tensor cores for fp32 matmuls and convolutions (10-bit mantissa inputs, fp32
    accumulation; what most GPU trainers enable) and, for fixed input shapes, cuDNN's
    autotuner (its first pass per shape is slower, every later one faster). No-op elsewhere."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = fixed_shapes


class Precision:
    """Autocast context + optional GradScaler for ``amp`` on ``device``.

    ``bf16`` autocasts on CPU and CUDA (no scaler: bf16 has fp32's exponent range); ``fp16``
    needs CUDA and a GradScaler; elsewhere it falls back to fp32 with a warning, so a GPU config
    still runs (slowly, exactly) on a laptop.
    """

    def __init__(self, amp: str, device: torch.device):
        self.dtype: torch.dtype | None = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.device_type = device.type
        if self.dtype is torch.float16 and device.type != "cuda":
            warnings.warn(f"amp=fp16 needs CUDA; training in fp32 on {device}", stacklevel=3)
            self.dtype = None
        if self.dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise CastsegError(f"train.amp=bf16: {torch.cuda.get_device_name(device)} has no bf16 support (it needs "
                               f"compute capability 8.0 or newer: A100, H100, RTX 30xx, ...); use train.amp=fp16")
        if self.dtype is torch.bfloat16 and device.type not in ("cuda", "cpu"):
            warnings.warn(f"amp=bf16 autocast is not supported on {device}; training in fp32", stacklevel=3)
            self.dtype = None
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype is torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
