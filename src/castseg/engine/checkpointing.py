"""Resumable training checkpoints, written atomically, read without pickle.

Layout of ``run_dir/checkpoints/last/`` (and ``best/``, model only)::

    model.safetensors, model.json      the model (a castseg checkpoint for a StudentModel, loadable
                                       by load_checkpoint / `castseg eval`; else a plain state dict)
    trainer_state.safetensors          tensors: optimizer moments ("optimizer/<param>/<key>"),
                                       every rank's RNG states ("rng/<rank>/<key>")
    trainer_state.json                 the rest: step, complete flag, optimizer groups, scheduler,
                                       grad scaler, data-stream positions, train config, result,
                                       and the sha256 of every other file; written last

A checkpoint directory is filled under a temporary name, fsync'ed, then swapped in by renames:
``last`` → ``last.old``, temp → ``last``, then ``last.old`` is deleted. A kill at any moment
leaves either a complete ``last``, or a complete ``last.old`` (+ an ignored temp dir);
:func:`find_checkpoint` takes the newest directory whose hashes check out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from castseg import __version__
from castseg.data.coco_io import read_json, write_json
from castseg.data.split import sha256_file
from castseg.errors import CastsegError
from castseg.models.checkpoint import META_NAME, WEIGHTS_NAME, _cpu_state, save_checkpoint

FORMAT = "castseg-trainer-state"
FORMAT_VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
TMP_PREFIX = ".tmp-"


# --- atomic directories ------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def write_dir_atomic(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``final`` by ``fill(tmp_dir)``, fsync, and swap it in by renames.

    The previous ``final`` survives as ``final.old`` until the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    # mkdtemp makes it owner-only; give it the permissions of its parent (made with the user's umask).
    os.chmod(tmp, final.parent.stat().st_mode & 0o777)
    try:
        fill(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = final.with_name(final.name + ".old")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_partial(root: Path) -> list[Path]:
    """Delete temp directories a killed writer left under ``root``; returns them."""
    gone = []
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


# --- model weights -----------------------------------------------------------------------------


def save_model_weights(folder: Path, model: nn.Module, step: int, class_names: Sequence[str] | None = None,
                       run_config: dict | None = None, extra: dict | None = None) -> None:
    """A StudentModel as a castseg checkpoint (``load_checkpoint`` reads it); any other module
    as ``model.safetensors`` + a small ``model.json``."""
    from safetensors.torch import save_file

    arch = getattr(getattr(model, "config", None), "to_dict", None)
    if arch is not None and "num_classes" in arch():
        names = list(class_names) if class_names is not None else [str(i) for i in range(arch()["num_classes"])]
        save_checkpoint(folder, model, run_config, names, step, extra=extra)
        return
    save_file(_cpu_state(model), str(folder / WEIGHTS_NAME), metadata={"format": "castseg-state-dict"})
    write_json({"format": "castseg-state-dict", "module": type(model).__name__, "step": int(step),
                "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(folder / WEIGHTS_NAME)},
                "extra": extra or {}}, folder / META_NAME, indent=2)


def weights_sha256(model: nn.Module) -> str:
    """sha256 of ``model``'s state dict (keys and bytes, in sorted key order): a stage's
    starting point, so a run can tell whether the stage before it was redone."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}\0{v.dtype}\0{list(v.shape)}\0".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())  # as bytes: numpy has no bfloat16
    return h.hexdigest()


def load_model_weights(folder: Path, model: nn.Module) -> None:
    """Load ``folder/model.safetensors`` into ``model`` (strict: same architecture)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / WEIGHTS_NAME))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CastsegError(f"{folder}: the checkpoint's weights do not fit this model (was the model config "
                           f"changed?): {str(e).splitlines()[0]}") from None


# --- JSON-safe state ---------------------------------------------------------------------------


def json_safe(x: Any) -> Any:
    """Optimizer/scheduler state values as JSON (tuples → lists, 0-d tensors → numbers)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (np.generic,)):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store {type(x).__name__} in a checkpoint json")


def optimizer_to_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` → (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for pid, entry in sd["state"].items():
        out = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                key = f"optimizer/{pid}/{k}"
                tensors[key] = v.detach().cpu().contiguous()
                out[k] = {"tensor": key}
            else:
                out[k] = json_safe(v)
        state[str(pid)] = out
    return tensors, {"state": state, "param_groups": json_safe(sd["param_groups"])}


def optimizer_from_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                           current: torch.optim.Optimizer) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_tensors`; JSON lists go back to tuples where the live
    optimizer has tuples (``betas``)."""
    state = {int(pid): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                        for k, v in entry.items()} for pid, entry in meta["state"].items()}
    groups = []
    for saved, live in zip(meta["param_groups"], current.param_groups):
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


# --- RNG ---------------------------------------------------------------------------------------


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch CPU (+ each initialised CUDA device), NumPy's
    MT19937 key, and a uint8 JSON blob with NumPy's counters and Python's ``random`` state."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [version, list(py_state), py_gauss]}
    out["meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only for devices that exist here)."""
    torch.set_rng_state(states["torch"].to(torch.uint8))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in states:
                torch.cuda.set_rng_state(states[f"cuda{i}"].to(torch.uint8), i)
    meta = json.loads(bytes(states["meta"].numpy().tobytes()).decode())
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, states["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


@contextlib.contextmanager
def preserved_rng():
    """Run the block, then put every RNG back as it was (validation must not shift training)."""
    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_to_bytes(states: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in states.items()})


def rng_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


# --- trainer checkpoints -----------------------------------------------------------------------


class InvalidCheckpoint(Exception):
    """A checkpoint directory that is incomplete or does not match its recorded hashes."""


@dataclass
class TrainerCheckpoint:
    """A validated checkpoint directory: ``state`` is its trainer_state.json."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def complete(self) -> bool:
        return bool(self.state.get("complete"))

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / STATE_TENSORS))

    def rng(self, rank: int, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """Rank ``rank``'s RNG states, None when the checkpoint has none for it."""
        prefix = f"rng/{rank}/"
        got = {k[len(prefix):]: v for k, v in (tensors or self.tensors()).items() if k.startswith(prefix)}
        return got or None


def save_trainer_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], rng_per_rank: Sequence[dict[str, torch.Tensor]],
                            class_names: Sequence[str] | None = None, run_config: dict | None = None) -> Path:
    """Write a complete checkpoint to ``folder`` atomically (see the module doc).

    ``state``: JSON-able trainer state (step, complete, scheduler, scaler, data positions,
    train config, result...); the optimizer and RNG parts are added here.
    """
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        step = int(state["step"])
        save_model_weights(tmp, model, step, class_names, run_config, extra={"stage": state.get("stage")})
        tensors, opt_meta = optimizer_to_tensors(optimizer.state_dict())
        for rank, rng in enumerate(rng_per_rank):
            tensors.update({f"rng/{rank}/{k}": v.contiguous() for k, v in rng.items()})
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": FORMAT})
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "castseg_version": __version__,
                "torch_version": torch.__version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **json_safe(state), "optimizer": opt_meta, "rng_ranks": len(rng_per_rank), "files": files}
        write_json(meta, tmp / STATE_JSON, indent=1)  # last: its presence marks a complete directory

    return write_dir_atomic(folder, fill)


def read_trainer_checkpoint(folder: Path, verify: bool = True) -> TrainerCheckpoint:
    """Validate ``folder``; raises :class:`InvalidCheckpoint` saying what is wrong."""
    folder = Path(folder)
    sj = folder / STATE_JSON
    if not sj.is_file():
        raise InvalidCheckpoint(f"{folder}: no {STATE_JSON} (an interrupted write)")
    try:
        state = json.loads(sj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpoint(f"{sj}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise InvalidCheckpoint(f"{sj}: not a castseg trainer state")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise InvalidCheckpoint(f"{sj}: format_version {state['format_version']} is newer than this castseg reads")
    for name, digest in (state.get("files") or {}).items():
        p = folder / name
        if not p.is_file():
            raise InvalidCheckpoint(f"{p}: missing")
        if verify and sha256_file(p) != digest:
            raise InvalidCheckpoint(f"{p}: sha256 does not match {STATE_JSON} (corrupt or truncated)")
    if not {WEIGHTS_NAME, STATE_TENSORS} <= set(state.get("files") or {}):
        raise InvalidCheckpoint(f"{sj}: does not list the model and trainer tensors")
    return TrainerCheckpoint(folder, state)


def find_checkpoint(folder: Path, verify: bool = True) -> TrainerCheckpoint | None:
    """The newest valid one of ``folder`` and ``folder.old`` (left by a kill mid-swap); invalid
    ones are reported with a warning and skipped. None when there is none."""
    found = []
    for cand in (Path(folder), Path(str(folder) + ".old")):
        if cand.exists():
            try:
                found.append(read_trainer_checkpoint(cand, verify))
            except InvalidCheckpoint as e:
                warnings.warn(f"ignoring checkpoint {e}", stacklevel=2)
    return max(found, key=lambda c: c.step) if found else None


def read_best(folder: Path) -> dict[str, Any] | None:
    """``best.json`` of a ``checkpoints/best`` folder (step, metrics), None when absent."""
    p = Path(folder) / "best.json"
    return read_json(p) if p.is_file() else None


def save_best(folder: Path, model: nn.Module, step: int, metrics: dict[str, Any],
              class_names: Sequence[str] | None = None, run_config: dict | None = None) -> Path:
    """The model alone (+ ``best.json``) in ``folder``, atomically."""
    def fill(tmp: Path) -> None:
        save_model_weights(tmp, model, step, class_names, run_config, extra={"val": metrics})
        write_json({"step": int(step), "metrics": json_safe(metrics)}, tmp / "best.json", indent=1)

    return write_dir_atomic(folder, fill)
