"""Setting an earlier run's output aside instead of deleting it.

A stage (or a pseudo-label cache) made with other settings than the current run's is renamed to
``<name>.stale-<n>`` and the work starts over. Nothing is deleted: the earlier run may be the
only copy of hours of training, and whether it is still wanted is the user's call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def stale_name(path: Path, n: int) -> Path:
    """``distill`` → ``distill.stale-<n>``, ``adapt_a.json`` → ``adapt_a.stale-<n>.json`` (a
    file keeps its suffix, so a set-aside cache still opens as what it is)."""
    suffix = "" if path.is_dir() else path.suffix
    return path.with_name(f"{path.name[:len(path.name) - len(suffix)]}.stale-{n}{suffix}")


def move_aside(path: str | Path, companions: Sequence[str] = ()) -> Path:
    """Rename ``path`` and its companions (``str(path) + suffix`` for each suffix, e.g. a
    cache's ``.manifest.json``) to the first ``n`` for which no target exists; returns the new
    name of ``path``. Companions follow their main file, so they keep pairing up."""
    path = Path(path)
    n = 1
    while True:
        new = stale_name(path, n)
        if not any(Path(str(new) + c).exists() for c in ("", *companions)):
            break
        n += 1
    for c in ("", *companions):
        if Path(str(path) + c).exists():
            os.replace(str(path) + c, str(new) + c)
    return new
