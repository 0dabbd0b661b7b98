"""Infinite, resumable, rank-sharded batch streams.

A :class:`BatchStream` cycles over a dataset epoch after epoch. Everything random about it is a
pure function of ``(seed, stream name, epoch, ...)``:

- the epoch's order: a permutation drawn from a generator seeded by ``(seed, name, epoch)``,
  split across ranks like ``DistributedSampler`` (padded by wrapping so every rank gets the same
  number of batches);
- each sample's augmentation: ``dataset[i]`` runs with torch/NumPy/``random`` seeded by
  ``(seed, name, epoch, position)``, whatever worker process loads it (the caller's RNG is
  restored afterwards).

So the stream's position is two integers (``epoch``, batches ``consumed`` in it): resuming skips
the consumed batches' *indices* (no data is loaded for them) and reproduces the rest exactly,
with any number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Run the block with torch (CPU), NumPy and ``random`` seeded by ``seed``; restore after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)``: the item is computed under :func:`seeded_rng`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with seeded_rng(seed):
            return self.dataset[index]


class EpochSampler(Sampler):
    """This rank's ``(index, sample seed)`` keys of one epoch, from batch ``skip`` on.

    An epoch is ``repeats`` seeded permutations of the dataset (1 unless the dataset is smaller
    than one global batch, so a few labeled images still fill every batch), padded by wrapping
    to a multiple of ``world_size × batch_size`` and dealt round-robin to ranks.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, name: str = "data",
                 rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"stream {name!r}: the dataset is empty")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.name, self.rank, self.world_size = seed, name, rank, world_size
        self.repeats = max(1, math.ceil(batch_size * world_size / n))
        self.epoch, self.skip = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n * self.repeats / (self.batch_size * self.world_size))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        order: list[int] = []
        for r in range(self.repeats):
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, self.name, epoch, r))
                order += torch.randperm(self.n, generator=g).tolist()
            else:
                order += list(range(self.n))
        total = self.batches_per_epoch * self.batch_size * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]
        mine = range(self.rank, total, self.world_size)
        return [(order[p], derive_seed(self.seed, self.name, epoch, "item", p)) for p in mine]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_keys(self.epoch)[self.skip * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip) * self.batch_size


class BatchStream:
    """Endless batches of ``dataset``; ``next(stream)`` gives the collated batch.

    Construct with the data options, then the trainer calls :meth:`bind` with the run's seed,
    the stream's name and the rank layout before the first batch. Batches are always full
    (``batch_size`` items per rank). Position: :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn: Callable | None = None, shuffle: bool = True,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = True,
                 worker_init_fn: Callable | None = None, multiprocessing_context: Any = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.collate_fn, self.shuffle = dataset, batch_size, collate_fn, shuffle
        self.loader_kwargs = dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=worker_init_fn,
                                  multiprocessing_context=multiprocessing_context,
                                  persistent_workers=persistent_workers and num_workers > 0)
        self.epoch, self.consumed = 0, 0
        self.sampler: EpochSampler | None = None
        self._loader: DataLoader | None = None
        self._it: Iterator | None = None

    @classmethod
    def from_dataloader(cls, loader: DataLoader) -> "BatchStream":
        """Same dataset, batch size, collate and workers; its sampler is replaced by the seeded
        one (shuffled unless it was sequential)."""
        if loader.batch_size is None:
            raise ValueError("a DataLoader with a custom batch_sampler or batch_size=None cannot be resumed; "
                             "pass a BatchStream")
        if loader.drop_last is False and len(loader.dataset) % loader.batch_size:  # type: ignore[arg-type]
            warnings.warn("BatchStream always yields full batches (drop_last is ignored)", stacklevel=2)
        return cls(loader.dataset, loader.batch_size, collate_fn=loader.collate_fn,
                   shuffle=isinstance(loader.sampler, RandomSampler), num_workers=loader.num_workers,
                   pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers or loader.num_workers > 0,
                   worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context)

    def bind(self, name: str, seed: int, rank: int = 0, world_size: int = 1) -> "BatchStream":
        self.sampler = EpochSampler(len(self.dataset), self.batch_size, self.shuffle, seed,  # type: ignore[arg-type]
                                    name, rank, world_size)
        # A private generator: DataLoader draws each iterator's worker base seed from it instead of
        # the global torch RNG, so re-creating the iterator on resume leaves the training RNG intact.
        gen = torch.Generator().manual_seed(derive_seed(seed, name, "loader", rank))
        self._loader = DataLoader(SeededItems(self.dataset), batch_sampler=BatchSampler(self.sampler, self.batch_size,
                                  drop_last=True), collate_fn=self.collate_fn, generator=gen, **self.loader_kwargs)
        self._it = None
        return self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None  # the next batch comes from a fresh iterator at the restored position

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Any:
        if self.sampler is None or self._loader is None:
            raise RuntimeError("BatchStream.bind(name, seed, rank, world_size) must be called first")
        for _ in range(2):  # at most one epoch boundary per batch
            if self._it is None:
                if self.consumed >= self.sampler.batches_per_epoch:
                    self.epoch, self.consumed = self.epoch + 1, 0
                self.sampler.set_epoch(self.epoch, self.consumed)
                self._it = iter(self._loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.consumed = self.epoch + 1, 0
                continue
            self.consumed += 1
            return batch
        raise RuntimeError(f"stream {self.sampler.name!r} produced no batch in a whole epoch")


def loader_settings(num_workers: int | str, device: torch.device) -> dict[str, Any]:
    """``num_workers`` / ``pin_memory`` of the DataLoaders feeding ``device``. ``"auto"``: on a
    GPU, this process's share of the CPUs it may use (all ranks of a node share them; one core
    left to the training loop), at most 8; on a CPU 0, as the model computes on those cores.
    Pinned host memory lets batches copy to a GPU asynchronously."""
    cuda = device.type == "cuda"
    if num_workers == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        num_workers = min(8, max(1, per_process - 1)) if cuda else 0
    return {"num_workers": int(num_workers), "pin_memory": cuda}


def to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Tensors inside dicts / lists / tuples moved to ``device`` (other leaves unchanged)."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking and device.type == "cuda")
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in obj]
        return type(obj)(moved) if isinstance(obj, list) or not hasattr(obj, "_fields") else type(obj)(*moved)
    return obj
