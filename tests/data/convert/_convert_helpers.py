"""Helpers for the ``castseg convert`` tests (tests/data/convert/)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from castseg.cli import main


def run_cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    """Exit 2 with exactly one stderr line, no traceback, mentioning every needle."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (what converters must never change)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def save_png(path: Path, arr: np.ndarray) -> Path:
    """Save with the mode Pillow infers: uint8 [H,W] → L, [H,W,3|4] → RGB|RGBA, uint16 → I;16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def truncate(path: Path) -> Path:
    """Keep the first half of the file's bytes (a download cut short)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
