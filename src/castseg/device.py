"""Which device a process computes on: :func:`resolve_device` (``auto`` / ``cpu`` / ``cuda`` /
``cuda:N``), the one rule every command, stage and loader follows — under ``torchrun`` each
process takes its own GPU (``LOCAL_RANK``)."""

from __future__ import annotations

import os

import torch

from castseg.errors import CastsegError


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"`` → ``cuda:<local_rank>`` when CUDA is available, else CPU; ``"cuda"`` gets the
    local rank's GPU (``LOCAL_RANK``, set by torchrun; 0 alone), so one config serves every
    process of a ``torchrun`` job. ``"cuda:N"`` under a multi-process job would put every rank
    on GPU N: refused with one line."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return torch.device("cuda", local_rank)
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise CastsegError(f"device {spec!r} under torchrun would put every process on GPU {dev.index}; use "
                           f"'cuda' or 'auto' (each process takes cuda:LOCAL_RANK) and choose GPUs with "
                           f"CUDA_VISIBLE_DEVICES")
    return dev
