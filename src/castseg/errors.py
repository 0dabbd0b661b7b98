"""Errors the user can act on.

Anything raised as :class:`CastsegError` is printed by the CLI as one line (no traceback) and
exits with code 2. The message must name the file (and record id, where there is one) and say
what is wrong, so the user can fix the input without reading our code.
"""

from __future__ import annotations

from pathlib import Path


class CastsegError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2


class InputError(CastsegError):
    """Malformed or inconsistent input data (images, annotation files, configs)."""

    def __init__(self, source: str | Path | None, problem: str):
        self.source = str(source) if source is not None else None
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)
