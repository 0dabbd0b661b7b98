"""What a GPU run gets without asking: loader workers and pinned memory, TF32 and the cuDNN
autotuner for fixed crops, bf16 refused where the GPU lacks it. Checked with the device faked:
the suite runs on CPUs."""

from __future__ import annotations

import pytest
import torch

from castseg.config_sections import TrainConfig
from castseg.engine.data import loader_settings
from castseg.engine.optim import Precision, set_cuda_math
from castseg.errors import CastsegError


def test_loader_workers_and_pinned_memory_on_a_gpu(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert TrainConfig().num_workers == "auto"
    assert loader_settings("auto", torch.device("cuda", 0)) == {"num_workers": 8, "pin_memory": True}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks share the node's 16 CPUs
    assert loader_settings("auto", torch.device("cuda", 3)) == {"num_workers": 3, "pin_memory": True}
    assert loader_settings("auto", torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
    assert loader_settings(2, torch.device("cpu")) == {"num_workers": 2, "pin_memory": False}
    with pytest.raises(ValueError):
        TrainConfig(num_workers=-1)


def test_tf32_and_cudnn_autotuner_only_on_cuda(monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        set_cuda_math(torch.device("cpu"), tf32=True, fixed_shapes=True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == flags[::2]
        set_cuda_math(torch.device("cuda", 0), tf32=True, fixed_shapes=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
        set_cuda_math(torch.device("cuda", 0), tf32=False, fixed_shapes=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(CastsegError, match="Tesla V100 has no bf16 support.*amp=fp16"):
        Precision("bf16", torch.device("cuda", 0))
    assert Precision("bf16", torch.device("cpu")).dtype is torch.bfloat16
