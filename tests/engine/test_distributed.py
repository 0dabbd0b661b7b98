"""Leaving the process group: a finished command waits for every rank before tearing it down."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from castseg.engine.distributed import cleanup_distributed


def _leave(rank: int, folder: str, synchronize: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    if rank == 0:  # rank 0 finishes last, as when it writes the command's files
        time.sleep(1.0)
        Path(folder, "rank0_done").touch()
    cleanup_distributed(synchronize)
    assert not dist.is_initialized()
    if rank == 1:
        Path(folder, "rank1_saw").write_text(str(Path(folder, "rank0_done").exists()))


@pytest.mark.parametrize("synchronize", [True, False])
def test_cleanup_waits_for_every_rank_only_when_asked(tmp_path, synchronize):
    mp.spawn(_leave, args=(str(tmp_path), synchronize), nprocs=2, join=True)
    # With the barrier, rank 1 leaves only after rank 0 finished its work; without it (after a
    # failure, when the others may never arrive) it leaves at once.
    assert (tmp_path / "rank1_saw").read_text() == str(synchronize)


def test_cleanup_without_a_process_group_is_a_no_op():
    assert not dist.is_initialized()
    cleanup_distributed(True)
    cleanup_distributed(False)
    assert not dist.is_initialized()
