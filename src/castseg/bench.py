"""Latency, throughput and peak memory of a predictor's forward pass, per runtime.

Times the network only (the part runtimes differ in), median of warm runs. Peak memory: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU the resident set size sampled every 2 ms
during the runs, minus the RSS before them (Linux ``/proc``; ``None`` elsewhere).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable

import torch


class _RssSampler:
    def __init__(self, period: float = 0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return None

    def __enter__(self) -> "_RssSampler":
        self.base = self.rss()
        self.peak = self.base or 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() or 0)
            time.sleep(self.period)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def extra_mb(self) -> float | None:
        return None if self.base is None else (self.peak - self.base) / 2**20


def time_fn(fn: Callable[[], object], repeats: int = 10, warmup: int = 2, device: str = "cpu") -> dict[str, float | None]:
    """``median_ms``, ``images_per_s`` (set by the caller's batch), ``peak_mb`` of ``fn``."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    # Warm-up inside the sampler: the first run allocates the working set we want to see.
    with _RssSampler() as rss:
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.extra_mb
    return {"median_ms": 1000 * statistics.median(times), "peak_mb": peak}


def bench_predictor_forward(runner: Callable[[torch.Tensor], object], images: torch.Tensor, repeats: int,
                            device: str = "cpu") -> dict[str, float | None]:
    with torch.no_grad():
        r = time_fn(lambda: runner(images), repeats=repeats, device=device)
    r["images_per_s"] = len(images) / (r["median_ms"] / 1000)
    return r
