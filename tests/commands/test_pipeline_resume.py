"""`castseg distill` SIGKILLed mid-training and re-run ends where an uninterrupted run does:
same final metrics.json AP/AP50 and bit-identical weights (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from castseg.engine.checkpointing import STATE_JSON
from castseg.models import load_checkpoint

from _kill import sigkill_after_checkpoint


ENV = {**os.environ, "CASTSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
MAX_STEPS = 8


def distill_cmd(root: Path, runs: Path) -> list[str]:
    # key=value overrides go right after CONFIG: argparse does not take them after the options.
    return [sys.executable, "-m", "castseg.cli", "distill", str(root / "tiny.yaml"), f"train.max_steps={MAX_STEPS}",
            "train.ckpt_every=2", "--runs", str(runs), "--teacher", str(root / "teacher")]


def test_killed_distill_resumes_to_identical_result(tiny_run):
    root = tiny_run
    # A: uninterrupted, alongside B (one thread each).
    a_log = root / "A.log"
    with a_log.open("w") as f:
        a = subprocess.Popen(distill_cmd(root, root / "A"), env=ENV, stdout=subprocess.DEVNULL, stderr=f)
    # B: the same command, SIGKILLed once a training checkpoint at step >= 3 exists.
    proc = subprocess.Popen(distill_cmd(root, root / "B"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = root / "B" / "tiny" / "distill" / "checkpoints" / "last" / STATE_JSON
    killed_at = sigkill_after_checkpoint(proc, state, 3, timeout=90, what="castseg distill")
    assert a.wait(timeout=120) == 0, a_log.read_text()[-3000:]
    assert killed_at is not None and killed_at < MAX_STEPS, killed_at
    assert not (root / "B" / "tiny" / "metrics.json").is_file() or \
        "student_distilled" not in json.loads((root / "B" / "tiny" / "metrics.json").read_text())
    b = subprocess.run(distill_cmd(root, root / "B"), env=ENV, capture_output=True, text=True, timeout=120)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "resumed from step" in b.stderr, b.stderr[-3000:]

    ma = json.loads((root / "A" / "tiny" / "metrics.json").read_text())["student_distilled"]
    mb = json.loads((root / "B" / "tiny" / "metrics.json").read_text())["student_distilled"]
    assert (mb["AP"], mb["AP50"]) == (ma["AP"], ma["AP50"])
    wa, _ = load_checkpoint(root / "A" / "tiny" / "distill" / "checkpoints" / "last")
    wb, _ = load_checkpoint(root / "B" / "tiny" / "distill" / "checkpoints" / "last")
    sa, sb = wa.state_dict(), wb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert json.loads(state.read_text())["step"] == MAX_STEPS
