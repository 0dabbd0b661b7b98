"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # Subprocess runs use one thread; same here, so in-process and subprocess float sums agree.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("CASTSEG_NO_PROGRESS", "1")
    yield
    torch.set_num_threads(n)
