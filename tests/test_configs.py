"""Every shipped config in configs/ parses against the schema (typos fail here, not on a cluster)."""

from pathlib import Path

import pytest

from castseg.config import load_config, train_config
from castseg.models import StudentConfig
from castseg.stages import loss_options

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    cfg = load_config(path)
    for stage in ("adapt", "distill", "refine"):
        train_config(cfg, (cfg.get(stage) or {}).get("train"))
    loss_options(cfg)
    if "model" in cfg and cfg["model"].get("preset"):
        StudentConfig.from_dict(cfg["model"])


def test_configs_exist():
    assert len(CONFIGS) >= 3
