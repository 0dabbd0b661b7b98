"""Every shipped config (configs/ and the demo's) parses against the schema (typos fail here, not on a cluster)."""

from pathlib import Path

import pytest

from castseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "src" / "castseg" / "assets" / "demo.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    cfg = load_config(path)
    for stage in ("adapt", "distill", "refine", "supervised"):
        assert cfg.stage_train(stage).max_steps > 0


def test_the_shipped_configs_are_the_documented_ones():
    # README points users at these by name
    assert sorted(p.name for p in CONFIGS) == ["cityscapes_10pct.yaml", "custom_example.yaml", "demo.yaml",
                                               "teacher_grounded_sam.yaml"]


def test_the_paper_config_keeps_the_paper_budget():
    cfg = load_config(ROOT / "configs" / "cityscapes_10pct.yaml")
    assert cfg.teacher.type == "grounded_sam" and cfg.model.preset == "small"
    assert cfg.stage_train("distill").max_steps == 90000 and cfg.stage_train("refine").lr == 5e-5
    assert cfg.loss.lambda_semi == 1.0 and cfg.loss.lambda_pxl == 0.1
