"""Distributed data-parallel plumbing: process-group setup, DDP wrapping, collectives.

The same training code runs in one process or under ``torchrun``::

    # one machine, 4 GPUs
    torchrun --nproc_per_node 4 -m castseg distill --config cfg.yaml
    # two machines (run on each; same --rdzv_endpoint, a port open between them)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST0:29500 --rdzv_id RUN -m castseg distill --config cfg.yaml

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
:func:`init_distributed` reads them (NCCL on GPUs, gloo on CPU). Only rank 0 writes files, so a
multi-node run needs the run directory on a filesystem every node sees only for *resuming*
(each rank reads the last checkpoint at start).

Collectives move fixed-size tensors only (no pickled Python objects): bytes travel as padded
uint8 tensors, on the GPU when the backend is NCCL.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from castseg.device import resolve_device
from castseg.errors import CastsegError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. ``device`` is where its model and batches live."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of the job (or no job): the one process that writes a run's files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 3600) -> DistInfo:
    """Join the process group when ``WORLD_SIZE`` > 1 (from ``torchrun``); no-op otherwise.

    ``timeout_s`` bounds how long ranks wait for each other — rank 0 validating while the others
    wait at a barrier counts, so it must exceed one validation. Returns the :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed(synchronize: bool = False) -> None:
    """Destroy the process group this process joined, if any. Left to interpreter exit, gloo's
    threads may still be running when the process dies ("terminate called without an active
    exception", SIGABRT), failing a run whose work was complete.

    ``synchronize``: wait for every rank first (for a command that succeeded). Rank 0 hosts the
    rendezvous store and often finishes last (it writes the files); a peer tearing its pairs down
    while rank 0 still sends is what aborted a finished run at exit. After a failure there is no
    barrier: the other ranks may never reach it (torchrun stops them)."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            _wait_for_every_rank()
        dist.destroy_process_group()


def _comm_device(info: DistInfo) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return info.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        _wait_for_every_rank(info.device.index)


def _wait_for_every_rank(cuda_index: int | None = None) -> None:
    """``dist.barrier`` on the joined group; NCCL's needs this rank's GPU (default: the current one)."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device() if cuda_index is None else cuda_index])
    else:
        dist.barrier()


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise mean of ``values`` over ranks (every rank must pass the same length)."""
    if not info.enabled or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def gather_bytes(data: bytes, info: DistInfo) -> list[bytes]:
    """Every rank's ``data`` (any lengths), in rank order, on every rank."""
    if not info.enabled:
        return [data]
    dev = _comm_device(info)
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    out = [torch.zeros_like(buf) for _ in range(info.world_size)]
    dist.all_gather(out, buf)
    return [bytes(o[: int(s)].cpu().numpy().tobytes()) for o, s in zip(out, sizes)]


def on_main(fn: Callable[[], Any], info: DistInfo) -> Any:
    """``fn()`` on rank 0 only, its JSON-able result returned on every rank (the others wait: a
    barrier too). Work that every rank would repeat (evaluation, scoring, reports) runs once.
    An error on rank 0 is raised there as itself and on the other ranks as one line naming rank
    0 (exceptions need not pickle), so no rank is left waiting in a collective."""
    if not info.enabled:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 — re-raised below, after the peers are told
            error = e
    ok, value = broadcast_json((error is None, result if error is None else f"rank 0: {error}"), info)
    if error is not None:
        raise error
    if not ok:
        raise CastsegError(value)
    return value


def broadcast_json(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """``obj`` (JSON-able) of rank ``src``, returned on every rank."""
    if not info.enabled:
        return obj
    data = json.dumps(obj).encode() if info.rank == src else b""
    return json.loads(gather_bytes(data, info)[src].decode())


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool = True) -> nn.Module:
    """DDP-wrap ``model`` (already on ``info.device``) when distributed; the model itself otherwise.

    DDP broadcasts rank 0's parameters and buffers here, so all ranks start identical.
    ``find_unused_parameters`` must stay True when some parameters get no gradient in a step
    (e.g. the student's embedding head when the loss asks for no embeddings).
    """
    if not info.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model
