"""Helpers of the rehearsal tests (tests/rehearsal): the configs' classes and overrides, tiny
data relabelled to a config's classes, and running castseg as a user does (its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
CITYSCAPES_CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
# Cityscapes label ids of the 8 thing classes, what `castseg convert cityscapes` assigns.
CITYSCAPES_IDS = [24, 25, 26, 27, 28, 31, 32, 33]
CUSTOM_CLASSES = ["cell", "nucleus", "debris"]  # configs/custom_example.yaml: num_classes: 3
# Every row a whole `castseg run` writes to metrics.json.
RUN_ROWS = ("teacher_zero_shot", "teacher_adapted_a", "teacher_adapted", "student_distilled", "student_refined",
            "student_supervised")
STAGES = ("adapt/a", "adapt/c", "distill", "refine", "supervised")

# Sizes and step counts only (the recipe's own values stay: amp, sampler, lr, λ's, teacher models,
# thresholds, ...). The student keeps the `small` preset's DINOv2 (from the hub id) and DPT neck but
# gets a narrow, 2-layer decoder: bf16 autocast on a CPU without bf16 matmuls makes the preset's
# 256-wide, 9-layer decoder ~11 s a step (0.35 s at these sizes).
SIZES = ["data.crop_size=[64,128]", "data.val_max_size=128", "model.num_queries=10", "model.hidden_dim=64",
         "model.mask_dim=64", "model.dim_feedforward=256", "model.dec_layers=2", "model.embed_hidden=64",
         "loss.num_points=256", "loss.max_anchors=64", "loss.num_negatives=16", "eval.topk=10",
         "pseudo_labels.max_size=128"]
# The grounded-SAM teacher's detector input (shortest, longest edge; default 800x1333).
TEACHER_SIZES = ["teacher.detector_size=[64,128]"]
STEPS = ["adapt.train.max_steps=2", "distill.train.max_steps=3", "refine.train.max_steps=2", "train.log_every=1",
         "train.batch_size=2"]


def shipped(name: str) -> Path:
    """A config shipped in configs/."""
    return CONFIGS / name


def data_overrides(split: dict[str, Path]) -> list[str]:
    return [f"data.labeled={split['labeled']}", f"data.unlabeled={split['unlabeled']}", f"data.val={split['val']}"]


# --- tiny data with the configs' classes ---------------------------------------------------------


def relabeled_split(out: Path, class_names: Sequence[str], category_ids: Sequence[int] | None = None
                    ) -> dict[str, Path]:
    """tests/conftest.py's 9-image split of the embedded default, its one ``nucleus`` category
    replaced by ``class_names`` (annotation k gets class k mod C), so a config's ``num_classes``
    and teacher ``class_names`` stay as shipped. Returns castseg split's files."""
    from castseg.demo import embedded_default
    from castseg.data.coco_io import load_coco
    from castseg.data.split import make_split, write_split

    ids = list(category_ids or range(1, len(class_names) + 1))
    coco = load_coco(embedded_default())
    d = coco.to_dict()
    keep = {img["id"] for img in coco.images[:9]}
    d["images"] = [i for i in d["images"] if i["id"] in keep]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
    for k, a in enumerate(d["annotations"]):
        a["category_id"] = ids[k % len(ids)]
    d["categories"] = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(ids, class_names)]
    d["images_root"] = str(coco.images_root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nine.json").write_text(json.dumps(d))
    sub = load_coco(out / "nine.json")
    split = make_split(sub, seed=0, labeled_fraction=0.4, val_fraction=0.25)
    return write_split(sub, split, out / "splits", 0, 0.4, 0.25)


def cityscapes_overrides(split: dict[str, Path]) -> list[str]:
    """configs/cityscapes_10pct.yaml's overrides: data paths, sizes, steps; nothing else."""
    return [*data_overrides(split), *SIZES, *TEACHER_SIZES, *STEPS]


# --- running commands as a user does -------------------------------------------------------------

WRITE_TRACER = textwrap.dedent('''
    # Test harness (tests/rehearsal): log every file-system write a process makes under
    # CASTSEG_TRACE_ROOT, through Python's audit events (open for writing, mkdir, rename, remove,
    # ...), to CASTSEG_TRACE_DIR/rank<RANK>.txt (torchrun's launcher itself, without RANK: none).
    import os, sys
    _root = os.environ.get("CASTSEG_TRACE_ROOT")
    _rank = os.environ.get("RANK")
    if _root and _rank is not None:
        _root = os.path.realpath(_root)
        _log = os.path.join(os.environ["CASTSEG_TRACE_DIR"], f"rank{_rank}.txt")
        _busy = [False]
        _EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate",
                   "shutil.copyfile", "shutil.move", "shutil.rmtree", "os.chmod"}

        def _hook(event, args):
            if _busy[0]:
                return
            if event == "open":
                path, mode, flags = args
                writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                if not writing:
                    return
                paths = [path]
            elif event in _EVENTS:
                paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            else:
                return
            for p in paths:
                try:
                    p = os.path.realpath(os.fsdecode(p))
                except (TypeError, ValueError):
                    continue
                if p == _root or p.startswith(_root + os.sep):
                    _busy[0] = True
                    try:
                        with open(_log, "a") as f:
                            f.write(f"{event} {p}\\n")
                    finally:
                        _busy[0] = False

        sys.addaudithook(_hook)
''')


def castseg(args: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 300,
            torchrun: int = 0) -> subprocess.CompletedProcess:
    """``castseg ARGS`` (``python -m castseg.cli``; under ``torchrun --nproc_per_node N`` when
    ``torchrun``) in ``cwd``; fails the test with the tail of stderr when it exits non-zero."""
    if torchrun:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(port), "-m", "castseg.cli", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "castseg.cli", *map(str, args)]
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"`castseg {' '.join(map(str, args))}` exited {proc.returncode}:\n{proc.stderr[-6000:]}",
                    pytrace=False)
    return proc


def traced_writes(trace_dir: Path, rank: int) -> list[tuple[str, str]]:
    """``(event, path)`` of each write :data:`WRITE_TRACER` logged for ``rank``."""
    log = trace_dir / f"rank{rank}.txt"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [tuple(line.split(" ", 1)) for line in lines]  # type: ignore[misc]


def tree(root: Path) -> set[str]:
    """Relative paths of every file and folder under ``root``."""
    return {p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())
