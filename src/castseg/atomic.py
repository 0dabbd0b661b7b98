"""Atomic file writes: write a temp file in the target's folder, then rename it into place.

A reader (or a resumed run) sees the old file or the whole new one, never half of one: a crash
or a kill mid-write leaves the target as it was. The rename is atomic on one filesystem, hence
the temp file beside the target. Protects against a killed process, not a power loss (no fsync;
:func:`castseg.engine.checkpointing.write_dir_atomic` fsyncs the checkpoint folders).
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a fresh temp path beside ``path`` for a writer to create; on success rename it to
    ``path``, on any exception delete it and leave ``path`` untouched.

    The temp name is ``.<name>.<random><suffix>`` (hidden; ``suffix`` for writers that care about
    the extension, e.g. ``".onnx"``). The folders above ``path`` are created. The writer creates
    the file itself, so it gets the usual permissions (umask), not ``mkstemp``'s owner-only 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` (``"w"`` or ``"wb"``) whose content replaces ``path`` only when the
    block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole new file: mode 'w' or 'wb', not {mode!r}")
    binary = mode == "wb"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f:
            yield f


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path``'s content by ``text`` atomically. Returns ``path``."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path``'s content by ``data`` atomically. Returns ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)
