"""`castseg distill` under torchrun: two CPU ranks (gloo, plain DDP: the CAST objective makes one
gradient-carrying forward per step) end with identical weights and one rank-0 checkpoint."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

from castseg import stages
from castseg.config import load_config
from castseg.engine.checkpointing import find_checkpoint, weights_sha256
from castseg.models import load_checkpoint


ENV = {**os.environ, "CASTSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_distill_two_ranks_keep_identical_weights(tiny_run):
    root = tiny_run
    hashes = root / "rank_weights"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "castseg.cli", "distill", str(root / "tiny.yaml"),
           "train.max_steps=20", "train.device=cpu", "train.ckpt_every=10",
           "train.log_every=5", "train.batch_size=1",
           "--runs", str(root / "runs"), "--teacher", str(root / "teacher")]
    proc = subprocess.run(cmd, env={**ENV, "CASTSEG_DEBUG_RANK_WEIGHTS_DIR": str(hashes)}, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [(hashes / f"distill.rank{r}.sha256").read_text().strip() for r in (0, 1)]
    assert len(ranks[0]) == 64 and ranks[0] == ranks[1]
    run = root / "runs" / "tiny"
    ckpt = find_checkpoint(run / "distill" / "checkpoints" / "last")
    assert ckpt is not None and ckpt.complete and ckpt.step == 20
    metrics = json.loads((run / "metrics.json").read_text())["student_distilled"]
    assert metrics["checkpoint"] == str(run / "distill" / "checkpoints" / "last")
    assert metrics["AP"] == metrics["AP50"] == 0.0  # 20 steps of batch 1 from random weights: nothing at IoU 0.5
    # it trained: the agreed weights are not θ_s⁰, and every logged loss (mean over both ranks) is finite.
    # (Whether 20 batch-1 steps lower the loss is a matter of which crops they drew, not of DDP.)
    theta0 = weights_sha256(stages.initial_student(load_config(root / "tiny.yaml")))
    assert ranks[0] != theta0 and weights_sha256(load_checkpoint(run / "distill" / "checkpoints" / "last")[0]) == ranks[0]
    header, *rows = (run / "distill" / "log.csv").read_text().splitlines()
    loss = [float(r.split(",")[header.split(",").index("loss")]) for r in rows]
    assert len(loss) == 4 and all(math.isfinite(v) and v > 0 for v in loss), loss
    assert (run / "pseudo_labels" / "teacher.json").is_file()
