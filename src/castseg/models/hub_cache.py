"""A fake Hugging Face hub cache of random-initialised models, for offline rehearsals.

The paper's recipe names hub models (``IDEA-Research/grounding-dino-base``,
``facebook/sam2.1-hiera-large``, ``facebook/dinov2-small``); a machine without network has none
of them. :func:`write_hub_cache` writes random models under those ids in the exact on-disk
layout of ``huggingface_hub``'s cache (https://huggingface.co/docs/hub/local-cache)::

    <cache_dir>/hub/models--ORG--NAME/
        refs/main                     # the snapshot's commit hash (40 hex digits, no newline)
        blobs/<sha256 of the file>    # file contents
        snapshots/<commit>/<file>     # relative symlinks to ../../blobs/<sha256> (copies where
                                      # the file system has no symlinks, as huggingface_hub does)

so that with ``HF_HOME=<cache_dir>`` (or ``HF_HUB_CACHE=<cache_dir>/hub``) and
``HF_HUB_OFFLINE=1``, ``from_pretrained("<hub id>")``, ``AutoTokenizer.from_pretrained`` and
``huggingface_hub.hf_hub_download(id, "config.json")`` resolve to these files exactly as they
resolve a real download. The weights are random: this proves plumbing (loading, dtypes,
devices, distributed runs), never quality.

Sizes: ``"tiny"`` (seconds on a CPU: :data:`~castseg.models.tiny_teacher.TINY_DETECTOR`,
:data:`~castseg.models.tiny_teacher.TINY_SEGMENTER` and :data:`TINY_DINOV2`) or ``"paper"`` (the
published architectures, :func:`castseg.models.sizes.paper_teacher_configs` and the ``small`` /
``base`` / ``large`` student presets' DINOv2: ~1 GB on disk, for GPU benchmarks). The detector's
tokenizer is a BERT tokenizer over :func:`~castseg.models.tiny_teacher.tiny_vocab` (the class
words + Grounding DINO's delimiter ids), saved in the detector's snapshot as the hub repo has it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from castseg.errors import CastsegError

# The hub ids of the paper's recipe (configs/*.yaml, `castseg demo --pretrained`) and their kinds.
PAPER_HUB_MODELS: dict[str, str] = {
    "IDEA-Research/grounding-dino-base": "grounding_dino",
    "IDEA-Research/grounding-dino-tiny": "grounding_dino",
    "facebook/sam2.1-hiera-large": "sam2",
    "facebook/dinov2-small": "dinov2",
}
KINDS = ("grounding_dino", "sam2", "dinov2")
SIZES = ("tiny", "paper")

# A DINOv2 with the public checkpoints' geometry (patch 14, 518 px position grid) and 12 layers,
# so the `small` preset's out_indices (2, 5, 8, 11) exist, but 32 wide: ~0.2M parameters.
TINY_DINOV2: dict[str, Any] = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 12,
                               "num_attention_heads": 2, "mlp_ratio": 2, "patch_size": 14, "image_size": 518,
                               "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "use_swiglu_ffn": False,
                               "drop_path_rate": 0.0}
# Paper-size DINOv2 per hub id (the student presets' encoder_config); others default to ViT-S/14.
_PAPER_DINOV2_PRESET = {"facebook/dinov2-small": "small", "facebook/dinov2-base": "base",
                        "facebook/dinov2-large": "large"}
# Words always in the detector's vocabulary: the embedded default's class and Cityscapes' things.
DEFAULT_WORDS = ("nucleus", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


def repo_folder_name(repo_id: str) -> str:
    """``"org/name"`` → ``"models--org--name"`` (huggingface_hub's ``repo_folder_name``)."""
    return "models--" + "--".join(repo_id.split("/"))


def hub_cache_root(cache_dir: str | Path) -> Path:
    """The ``hub`` folder inside an ``HF_HOME``-style ``cache_dir`` (what ``HF_HUB_CACHE`` names)."""
    return Path(cache_dir) / "hub"


def hub_env(cache_dir: str | Path) -> dict[str, str]:
    """Environment variables that make transformers / huggingface_hub read only this cache."""
    cache_dir = Path(cache_dir).resolve()
    return {"HF_HOME": str(cache_dir), "HF_HUB_CACHE": str(hub_cache_root(cache_dir)), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def detector_config(size: str = "tiny", repo_id: str = "IDEA-Research/grounding-dino-base") -> dict[str, Any]:
    """transformers ``GroundingDinoConfig`` kwargs for ``size``."""
    from castseg.models.sizes import paper_teacher_configs
    from castseg.models.tiny_teacher import TINY_DETECTOR

    _check_size(size)
    if size == "tiny":
        return json.loads(json.dumps(TINY_DETECTOR))
    name = "grounding-dino-large" if "large" in repo_id else "grounding-dino-base"
    return paper_teacher_configs()[name]


def segmenter_config(size: str = "tiny") -> dict[str, Any]:
    """transformers ``Sam2Config`` kwargs for ``size`` (paper: SAM2.1-Hiera-L)."""
    from castseg.models.sizes import paper_teacher_configs
    from castseg.models.tiny_teacher import TINY_SEGMENTER

    _check_size(size)
    return json.loads(json.dumps(TINY_SEGMENTER if size == "tiny" else paper_teacher_configs()["sam2.1-hiera-large"]))


def dinov2_config(size: str = "tiny", repo_id: str = "facebook/dinov2-small") -> dict[str, Any]:
    """A DINOv2 config dict (with ``model_type``) for ``size`` (paper: the student preset's)."""
    from castseg.models.student import PRESETS

    _check_size(size)
    if size == "tiny":
        return dict(TINY_DINOV2)
    return dict(PRESETS[_PAPER_DINOV2_PRESET.get(repo_id, "small")]["encoder_config"])


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise CastsegError(f"hub cache size must be one of {SIZES}, got {size!r}")


def build_hub_model(kind: str, size: str = "tiny", repo_id: str = "") -> torch.nn.Module:
    """A random-initialised transformers model of ``kind`` (see :data:`KINDS`)."""
    from transformers import (AutoConfig, AutoModel, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              Sam2Config, Sam2Model)

    if kind == "grounding_dino":
        return GroundingDinoForObjectDetection(GroundingDinoConfig(**detector_config(size, repo_id)))
    if kind == "sam2":
        return Sam2Model(Sam2Config(**segmenter_config(size)))
    if kind == "dinov2":
        d = dinov2_config(size, repo_id)
        return AutoModel.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    raise CastsegError(f"unknown hub model kind {kind!r}; expected one of {KINDS}")


def _preprocessor_config(kind: str) -> dict[str, Any] | None:
    """A minimal ``preprocessor_config.json`` as the hub repos hold (castseg itself resizes and
    normalises in torch; other tools reading the cache find the file they expect)."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if kind == "grounding_dino":
        return {"image_processor_type": "GroundingDinoImageProcessor", "processor_class": "GroundingDinoProcessor",
                "do_resize": True, "size": {"shortest_edge": 800, "longest_edge": 1333}, "do_normalize": True,
                "image_mean": mean, "image_std": std, "do_rescale": True, "rescale_factor": 1 / 255, "do_pad": True}
    if kind == "dinov2":
        return {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
                "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_normalize": True,
                "image_mean": mean, "image_std": std, "do_rescale": True, "rescale_factor": 1 / 255}
    return None


def _save_snapshot_files(kind: str, size: str, repo_id: str, words: Sequence[str], out: Path, seed: int) -> None:
    from castseg.models.tiny_teacher import save_tiny_tokenizer

    torch.manual_seed(seed)
    model = build_hub_model(kind, size, repo_id)
    model.save_pretrained(out, safe_serialization=True)
    del model
    if kind == "grounding_dino":
        save_tiny_tokenizer(out, words)
    pre = _preprocessor_config(kind)
    if pre is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link(target_rel: str, blob: Path, dst: Path) -> None:
    try:
        os.symlink(target_rel, dst)
    except OSError:  # no symlinks (some file systems): huggingface_hub copies then, so do we
        shutil.copyfile(blob, dst)


def add_snapshot(cache_dir: str | Path, repo_id: str, files_dir: str | Path, revision: str = "main") -> Path:
    """Put the files of ``files_dir`` into the hub cache as ``repo_id``'s snapshot at
    ``revision``; returns the snapshot folder. The commit hash is a digest of the files, so the
    same files give the same snapshot (rewriting is a no-op)."""
    files_dir = Path(files_dir)
    repo = hub_cache_root(cache_dir) / repo_folder_name(repo_id)
    files = sorted(p for p in files_dir.rglob("*") if p.is_file())
    if not files:
        raise CastsegError(f"{files_dir}: no files to cache for {repo_id}")
    digests = {p.relative_to(files_dir).as_posix(): _sha256(p) for p in files}
    commit = hashlib.sha1(json.dumps([repo_id, digests], sort_keys=True).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, digest in digests.items():
        blob = repo / "blobs" / digest
        if not blob.exists():
            tmp = blob.with_name(blob.name + ".incomplete")
            shutil.copyfile(files_dir / rel, tmp)
            os.replace(tmp, blob)
        dst = snapshot / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        _link(os.path.relpath(blob, dst.parent), blob, dst)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)  # huggingface_hub writes the bare hash
    return snapshot


def repo_seed(repo_id: str, seed: int = 0) -> int:
    """The torch seed a repo's random weights are drawn with: fixed per (id, seed), whatever
    else the cache holds, so :func:`build_hub_model` can rebuild the same weights."""
    return seed + int(hashlib.sha256(repo_id.encode()).hexdigest()[:8], 16)


def write_hub_cache(cache_dir: str | Path, models: Mapping[str, str] | None = None, size: str = "tiny",
                    class_words: Sequence[str] = (), seed: int = 0) -> dict[str, Path]:
    """Write random models into a hub cache at ``cache_dir`` (an ``HF_HOME``: the cache proper
    is ``cache_dir/hub``). ``models``: hub id → kind (``grounding_dino`` | ``sam2`` | ``dinov2``;
    default :data:`PAPER_HUB_MODELS`). ``class_words``: class names whose words the detectors'
    tokenizer must know (on top of :data:`DEFAULT_WORDS`). Returns hub id → snapshot folder.

    Use with :func:`hub_env` (``HF_HOME``, ``HF_HUB_OFFLINE=1`` ...) in the loading process."""
    _check_size(size)
    models = dict(PAPER_HUB_MODELS if models is None else models)
    for repo_id, kind in models.items():
        if kind not in KINDS:
            raise CastsegError(f"{repo_id}: unknown hub model kind {kind!r}; expected one of {KINDS}")
    words = [w for name in (*DEFAULT_WORDS, *class_words) for w in str(name).lower().replace("_", " ").split()]
    out: dict[str, Path] = {}
    for repo_id, kind in sorted(models.items()):
        with tempfile.TemporaryDirectory(prefix="castseg-hub-") as tmp:
            _save_snapshot_files(kind, size, repo_id, words, Path(tmp), repo_seed(repo_id, seed))
            out[repo_id] = add_snapshot(cache_dir, repo_id, tmp)
    return out
