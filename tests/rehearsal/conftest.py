"""Rehearsal of the paper's recipe: the shipped configs, the hub model ids, bf16, torchrun.

A session-wide fake Hugging Face hub cache (:mod:`castseg.models.hub_cache`, tiny random models
under the real ids) stands in for the network; every command runs in its own process, as a user
runs it, with ``HF_HOME`` pointing at that cache and ``HF_HUB_OFFLINE=1``. Configs are the
shipped YAML files with only data paths, sizes and step counts overridden
(rehearsal_harness.SIZES / STEPS).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rehearsal_harness import CITYSCAPES_CLASSES, CITYSCAPES_IDS, CUSTOM_CLASSES, relabeled_split


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """An ``HF_HOME`` holding tiny random models under the recipe's hub ids."""
    from castseg.models.hub_cache import write_hub_cache

    root = tmp_path_factory.mktemp("hf_home")
    write_hub_cache(root, size="tiny", class_words=[*CITYSCAPES_CLASSES, *CUSTOM_CLASSES])
    return root


@pytest.fixture(scope="session")
def hub_env(hub_cache) -> dict[str, str]:
    """The environment of a user's process on a machine whose hub cache is ``hub_cache``."""
    from castseg.models.hub_cache import hub_env as env

    return {**os.environ, **env(hub_cache), "CASTSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# --- tiny data with the configs' classes ---------------------------------------------------------


@pytest.fixture(scope="session")
def cityscapes_split(tmp_path_factory) -> dict[str, Path]:
    """A 9-image split whose categories are Cityscapes' 8 things (label ids 24..33)."""
    return relabeled_split(tmp_path_factory.mktemp("cs_data"), CITYSCAPES_CLASSES, CITYSCAPES_IDS)


@pytest.fixture(scope="session")
def custom_split(tmp_path_factory) -> dict[str, Path]:
    """A 9-image split with 3 categories (configs/custom_example.yaml's num_classes)."""
    return relabeled_split(tmp_path_factory.mktemp("custom_data"), CUSTOM_CLASSES)


