"""benchmarks/gpu_paper_recipe.sh, the prepared GPU check of the paper's recipe, dry-runs on
the CPU with the rehearsal's tiny hub models: every stage runs and is measured, and the results
table is written, so the command is known to work before a GPU machine is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rehearsal_harness import SIZES, TEACHER_SIZES

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_dry_runs_on_cpu(hub_cache, hub_env, tmp_path):
    env = {**hub_env, "SIZE": "tiny", "IMAGE": "64x128", "STEPS": "1", "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
           "HUB_CACHE": str(hub_cache), "SETS": " ".join([*SIZES, *TEACHER_SIZES, "train.batch_size=2"]),
           "PY": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_paper_recipe.sh")], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["device"] == "cpu" and res["size"] == "tiny" and res["crop"] == [64, 128]
    train = ("adapt/a", "adapt/c", "distill", "refine", "supervised")
    assert set(train) | {"pseudo-label adapt_a", "pseudo-label teacher"} == set(res["stages"])
    for name in train:
        row = res["stages"][name]
        assert row["sec_per_step"] > 0 and row["images_per_s"] > 0 and 0 <= row["loader_share"] < 1, name
        assert row["plan_gib"] > 0, name  # castseg plan's estimate beside it (peak: CUDA only)
    assert set(res["latency"]) == {"teacher (adapted)", "student (refined)"}
    assert all(r["latency_ms"] > 0 for r in res["latency"].values())
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| distill |" in table and "student (refined):" in table
    assert hub_cache.is_dir() and not (tmp_path / "out" / "data").exists()  # the given cache is kept
