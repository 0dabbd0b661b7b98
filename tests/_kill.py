"""Killing a training subprocess at a checkpoint, for the resume tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def sigkill_after_checkpoint(proc: subprocess.Popen, state_json: Path, min_step: int, timeout: float,
                             what: str = "the training subprocess") -> int | None:
    """SIGKILL ``proc`` as soon as ``state_json`` (the engine's trainer_state.json) records a
    step ≥ ``min_step``; returns that step (None if the timeout passed first). Fails if the
    process ends on its own before it could be killed."""
    killed_at = None
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            try:
                step = json.loads(state_json.read_text())["step"]
                if step >= min_step:
                    killed_at = step
                    break
            except (OSError, ValueError, KeyError):  # not written yet, or mid-rename
                pass
            assert proc.poll() is None, f"{what} ended before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    return killed_at
