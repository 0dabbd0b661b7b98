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


def test_a_fixed_gpu_under_torchrun_is_refused(monkeypatch):
    """`train.device: cuda:1` under torchrun used to put every rank on GPU 1."""
    from castseg.device import resolve_device
    from castseg.errors import CastsegError

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(CastsegError, match="every process on GPU 1"):
        resolve_device("cuda:1")
    assert str(resolve_device("cuda")) == "cuda:1" and str(resolve_device("cpu")) == "cpu"


def _main_only(rank: int, folder: str) -> None:
    from castseg.engine.distributed import DistInfo, on_main

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2)

    def work() -> dict:
        Path(folder, f"ran_on_{rank}").touch()
        return {"AP": 0.5, "rank": rank}

    Path(folder, f"result_{rank}").write_text(str(on_main(work, info)))

    def fail() -> None:
        raise ValueError("bad val json")

    try:
        on_main(fail, info)
    except Exception as e:  # rank 0: the error itself; rank 1: one line naming rank 0
        Path(folder, f"error_{rank}").write_text(f"{type(e).__name__}: {e}")
    cleanup_distributed(True)


def test_rank_0_work_runs_once_and_every_rank_gets_its_result_or_its_error(tmp_path):
    """Zero-shot evaluation, pseudo-label scoring and the report used to run on every rank."""
    mp.spawn(_main_only, args=(str(tmp_path),), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("ran_on_*")) == ["ran_on_0"]
    assert (tmp_path / "result_0").read_text() == (tmp_path / "result_1").read_text() == "{'AP': 0.5, 'rank': 0}"
    assert (tmp_path / "error_0").read_text() == "ValueError: bad val json"
    assert (tmp_path / "error_1").read_text() == "CastsegError: rank 0: bad val json"
