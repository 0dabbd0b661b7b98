"""castseg checkpoints: ``model.safetensors`` (weights) + ``model.json`` (everything else).

The json holds the full architecture (including the encoder's transformers config), so a
checkpoint from a run that started from pretrained hub weights rebuilds offline; the class
names; the training step; the run config; the castseg version; and the sha256 of the weights
file, checked on load. Weights are read with safetensors only (never pickle / ``torch.load``,
which can run code from the file). Both files are written atomically (temp file + rename); the
weights go first, so a crash in between leaves a json whose hash no longer matches, which
:func:`load_checkpoint` reports instead of loading mismatched weights.

``path`` may be a folder (``DIR/model.safetensors`` + ``DIR/model.json``) or a file name ending
in ``.safetensors`` / ``.json`` (the other file sits beside it with the same stem).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from castseg import __version__
from castseg.atomic import atomic_path
from castseg.data.coco_io import read_json, write_json
from castseg.data.split import sha256_file
from castseg.errors import CastsegError, InputError

FORMAT = "castseg-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
REQUIRED_KEYS = ("format", "format_version", "architecture", "class_names", "step", "weights")


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights file, json file)`` for a checkpoint folder or either of its files."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p / WEIGHTS_NAME, p / META_NAME


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu()
        if t.data_ptr() == v.data_ptr():  # already on CPU: copy, safetensors refuses shared storage
            t = t.clone()
        state[k] = t.contiguous()
    return state


SCALE_SUFFIX = ".__int8_scale__"


def quantize_int8(state: dict[str, torch.Tensor], min_numel: int = 4096) -> dict[str, torch.Tensor]:
    """Symmetric per-row int8 for float tensors of >= 2 dims and ``min_numel`` elements (scale
    ``[rows]`` fp32 under ``key + SCALE_SUFFIX``); every other tensor is kept as it is."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dim() >= 2 and v.numel() >= min_numel:
            rows = v.float().reshape(v.shape[0], -1)
            scale = (rows.abs().amax(1) / 127).clamp_min(1e-12)
            out[k] = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(v.shape).contiguous()
            out[k + SCALE_SUFFIX] = scale.contiguous()
        else:
            out[k] = v
    return out


def dequantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_int8` (fp32 values)."""
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(k + SCALE_SUFFIX)
        out[k] = v if scale is None else (v.float().reshape(v.shape[0], -1) * scale[:, None]).reshape(v.shape)
    return out


def save_checkpoint(path: str | Path, model: nn.Module, config: dict | None, class_names: Sequence[str],
                    step: int, extra: dict | None = None, quantize: str | None = None) -> Path:
    """Write ``model`` (a :class:`~castseg.models.student.StudentModel`) and its metadata.

    ``config``: the run config (JSON-able dict, stored as is); ``class_names``: one per class,
    in class-index order; ``extra``: any JSON-able additions (metrics, stage name...);
    ``quantize="int8"`` stores large weight matrices as per-row int8 (about half of fp16's size;
    for shipped assets — :func:`load_checkpoint` restores fp32).
    Returns the json path.
    """
    from safetensors.torch import save_file

    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise TypeError("save_checkpoint needs a StudentModel (with a StudentConfig in .config)")
    arch = model.config.to_dict()
    if len(class_names) != arch["num_classes"]:
        raise CastsegError(f"{len(class_names)} class names given for a model with {arch['num_classes']} classes")
    if quantize not in (None, "int8"):
        raise CastsegError(f"quantize must be None or 'int8', got {quantize!r}")
    arch["pretrained"] = False  # the weights are in the checkpoint; rebuilding must not hit the hub
    weights, meta_path = checkpoint_paths(path)
    with atomic_path(weights, suffix=".tmp") as tmp:
        state = quantize_int8(_cpu_state(model)) if quantize else _cpu_state(model)
        save_file(state, str(tmp), metadata={"format": FORMAT})
        digest, size = sha256_file(tmp), tmp.stat().st_size
    import transformers

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "castseg_version": __version__,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": arch, "class_names": list(class_names), "step": int(step),
        "weights": {"file": weights.name, "sha256": digest, "bytes": size,
                    **({"quantization": "int8"} if quantize else {})},
        "config": config or {}, "extra": extra or {},
    }
    write_json(meta, meta_path, indent=2)
    return meta_path


def read_checkpoint_meta(path: str | Path) -> tuple[dict, Path, Path]:
    """Read and validate the json; returns ``(meta, weights path, json path)``."""
    weights, meta_path = checkpoint_paths(path)
    if Path(path).is_dir() and not meta_path.exists():
        raise InputError(path, f"not a castseg checkpoint folder (no {META_NAME})")
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise InputError(meta_path, "not a castseg checkpoint json (top level is not an object)")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise InputError(meta_path, f"missing key(s) {missing}: not a complete castseg checkpoint json")
    if meta["format"] != FORMAT:
        raise InputError(meta_path, f"format is {meta['format']!r}, expected {FORMAT!r}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise InputError(meta_path, f"format_version {meta['format_version']!r} is newer than this castseg "
                         f"({__version__}) reads ({FORMAT_VERSION}); upgrade castseg")
    w = meta["weights"]
    if not isinstance(w, dict) or not {"file", "sha256"} <= set(w):
        raise InputError(meta_path, "key 'weights' must hold 'file' and 'sha256'")
    if not isinstance(meta["architecture"], dict):
        raise InputError(meta_path, "key 'architecture' must be an object")
    weights = meta_path.parent / w["file"]
    if not weights.is_file():
        raise InputError(weights, f"weights file not found (named by {meta_path})")
    return meta, weights, meta_path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", verify: bool = True
                    ) -> tuple[nn.Module, dict]:
    """Rebuild the model from the json (no hub access) and load the safetensors weights.

    Returns ``(model in eval mode on device, meta dict)``. Any missing, corrupt or mismatched
    file raises :class:`~castseg.errors.InputError` naming it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from castseg.models.student import StudentConfig, StudentModel

    meta, weights, meta_path = read_checkpoint_meta(path)
    if verify and sha256_file(weights) != meta["weights"]["sha256"]:
        raise InputError(weights, f"sha256 does not match the one in {meta_path.name}: the weights file is "
                         f"corrupt, truncated or from another save")
    try:
        cfg = StudentConfig.from_dict({**meta["architecture"], "pretrained": False}, source=str(meta_path))
        model = StudentModel(cfg)
    except CastsegError as e:
        raise InputError(meta_path, f"cannot rebuild the architecture: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(meta_path, f"cannot rebuild the architecture: {type(e).__name__}: {e}") from None
    try:
        state = load_file(str(weights))
        if meta["weights"].get("quantization") == "int8":
            state = dequantize_int8(state)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(weights, f"not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = [f"{name} {keys[:5]}{' ...' if len(keys) > 5 else ''}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)) if keys]
        raise InputError(weights, f"weights do not match the architecture in {meta_path.name}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta
