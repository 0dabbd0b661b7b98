"""The one loader: a path → a frozen model behind the one inference contract
(:class:`~castseg.models.teacher.Teacher`: ``predict(images [B,3,H,W]) -> instances``), plus a
fingerprint that says whether a pseudo-label cache was made by the same weights and options.

What a path holds is decided here and only here: a castseg checkpoint (folder, ``model.json`` or
``.safetensors``) → a student-architecture model; an ``.onnx`` file → the same model run by
onnxruntime; a teacher folder (``teacher.json``: grounded-SAM; ``teacher.yaml``: ensembles, TTA)
or a teacher config (``.yaml`` / ``.json``) → whatever it describes. Everything ends in
:func:`castseg.models.teacher_factory.build_teacher`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from castseg.data.coco_io import read_json
from castseg.data.split import sha256_file
from castseg.errors import CastsegError, InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")
# Options that may name a local model folder instead of a hub id (GroundedSAMTeacher's).
LOCAL_MODEL_KEYS = ("detector", "segmenter", "tokenizer")


def _walk_config(cfg: Any, base: Path, source: Path, found: list[Path]) -> tuple[Any, Any]:
    """(config with local paths resolved against ``base``, config without them), collecting the
    paths in ``found`` (their weights get hashed). Paths are left out of the fingerprint: moving
    a teacher folder must not invalidate its cache. Hub ids stay as they are (identified by name)."""
    if isinstance(cfg, list):
        pairs = [_walk_config(v, base, source, found) for v in cfg]
        return [a for a, _ in pairs], [b for _, b in pairs]
    if not isinstance(cfg, dict):
        return cfg, cfg
    resolved, stripped = {}, {}
    for k, v in cfg.items():
        local = (Path(v) if Path(v).is_absolute() else base / v) if isinstance(v, str) else None
        if k == "path" and local is not None and not local.exists():
            raise InputError(source, f"teacher path {v!r} not found (resolved to {local})")
        if local is not None and (k == "path" or (k in LOCAL_MODEL_KEYS and local.exists())):
            found.append(local)
            resolved[k] = str(local)
        else:
            resolved[k], stripped[k] = _walk_config(v, base, source, found)
    return resolved, stripped


def _resolve(path: Path, found: list[Path], weights: dict[str, str]) -> tuple[dict, dict]:
    """``(build_teacher config, path-free config)`` of a teacher folder, a teacher config or a
    castseg checkpoint; local weight paths go to ``found``, already-known hashes to ``weights``."""
    import yaml

    from castseg.models.checkpoint import read_checkpoint_meta

    if path.suffix.lower() == ".onnx" and path.is_file():
        from castseg.models.onnx_network import onnx_class_names

        found.append(path)
        return {"type": "onnx", "path": str(path)}, {"type": "onnx", "class_names": onnx_class_names(path)}
    is_config = path.suffix.lower() in (".yaml", ".yml")
    if path.suffix.lower() == ".json" and path.is_file():
        head = read_json(path)
        is_config = not (isinstance(head, dict) and head.get("format") == "castseg-checkpoint")
    if path.is_dir() and (path / "teacher.json").is_file():
        found.append(path)
        return {"type": "grounded_sam", "path": str(path)}, {"type": "grounded_sam", **read_json(path / "teacher.json")}
    if is_config:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise InputError(path, f"not a readable teacher config ({str(e).splitlines()[0]})") from None
        raw = raw.get("teacher", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict) or "type" not in raw:
            raise InputError(path, "a teacher config needs a mapping with 'type' (optionally under 'teacher:')")
        return _walk_config(raw, path.parent, path, found)
    meta, wfile, _ = read_checkpoint_meta(path)
    # load_checkpoint verifies this hash against the file, so it need not be recomputed.
    weights[wfile.name] = meta["weights"]["sha256"]
    return ({"type": "checkpoint", "path": str(path)},
            {"type": "checkpoint", "architecture": meta["architecture"], "class_names": meta["class_names"]})


def load_model(spec: str | Path, device: Any = "auto", fingerprint: bool = True, threads: int | None = None
               ) -> tuple[Any, dict[str, Any]]:
    """Build a frozen model from a castseg checkpoint (folder, ``model.json`` or
    ``.safetensors``), an exported ``.onnx`` file, a teacher folder (``teacher.json``) or a teacher config (``.yaml`` /
    ``.json``: a :func:`~castseg.models.teacher_factory.build_teacher` mapping, optionally under a
    ``teacher:`` key; relative ``path`` values are relative to the config's folder).

    ``threads``: onnxruntime's threads for an ``.onnx`` file. ``device``: where the model runs ("auto": this process's GPU if there is one, else CPU;
    a ``torch.device`` too).

    Returns ``(teacher, info)`` with ``info = {"spec", "config", "weights": {file: sha256},
    "sha256"}``; ``sha256`` fingerprints the weights and the path-free config together. With
    ``fingerprint=False`` (a teacher only to predict with) the weight files are not read twice
    for hashing, and ``weights`` / ``sha256`` are empty / None.
    """
    from castseg.device import resolve_device
    from castseg.models.teacher_factory import build_teacher

    device = str(resolve_device(str(device)))  # "auto": this process's GPU (cuda:LOCAL_RANK) if any, else CPU
    path = Path(spec)
    if not path.exists():
        raise InputError(path, "not found (expected a model: a castseg checkpoint, an .onnx file, a teacher folder "
                         "with teacher.json or teacher.yaml, or a teacher config .yaml/.json)")
    if path.is_dir() and (path / "teacher.yaml").is_file():  # e.g. an adapted ensemble (save_pretrained)
        path = path / "teacher.yaml"
    found: list[Path] = []
    weights: dict[str, str] = {}
    cfg, config = _resolve(path, found, weights)
    for ref in found if fingerprint else []:
        files = [ref] if ref.is_file() else sorted(p for p in ref.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
        for f in files:
            weights[f.relative_to(ref.parent).as_posix()] = sha256_file(f)
    if cfg["type"] in ("checkpoint", "onnx"):
        cfg = {**cfg, "device": device, **({"threads": threads} if cfg["type"] == "onnx" and threads else {})}
    try:
        teacher = build_teacher(cfg)
    except InputError:
        raise
    except CastsegError as e:
        raise InputError(path, str(e)) from None
    teacher = teacher.to(device).eval().requires_grad_(False)
    if not fingerprint:
        return teacher, {"spec": str(path), "config": config, "weights": {}, "sha256": None}
    blob = json.dumps({"config": config, "weights": weights}, sort_keys=True, default=str)
    info = {"spec": str(path), "config": config, "weights": weights,
            "sha256": hashlib.sha256(blob.encode()).hexdigest()}
    return teacher, info
