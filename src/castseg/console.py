"""What castseg tells people while it works: log messages and progress, on stderr.

Every module logs to ``logger = logging.getLogger(__name__)``, a child of the ``castseg``
logger. Results a command was asked for (a JSON with ``--json``, a metrics table, ``castseg
info``'s table) are printed to stdout instead, so they can be piped.

As a library, castseg adds only a :class:`logging.NullHandler` to the ``castseg`` logger (in
``castseg/__init__.py``): its records propagate to the program's own logging set-up, and with none
nothing is shown, warnings included (the NullHandler keeps Python's last-resort handler quiet).
The ``castseg`` CLI, and a script that wants the CLI's output, calls :func:`install`, which
attaches one handler: plain ``%(message)s`` lines (``warning: ...`` for warnings and above) on the
*current* ``sys.stderr``, written through tqdm so that a line never tears a live progress bar, at
level INFO, and stops propagation (or a root handler would print every record twice). The CLI's
``--quiet`` / ``--verbose`` make the level WARNING / DEBUG (:func:`set_verbosity`);
:func:`uninstall` undoes :func:`install`.

Progress: a tqdm bar only when stderr is a terminal (and the level shows INFO, and
``CASTSEG_NO_PROGRESS`` is unset); elsewhere (logs, CI, pipes) :class:`Progress` writes one plain
line every ``every`` items, at most one per ``CASTSEG_PROGRESS_SECONDS`` (default 5) seconds,
never a carriage return. Training writes its own line every ``log_every`` steps
(:class:`castseg.engine.logs.TrainLogger`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")
ROOT = "castseg"
logger = logging.getLogger(__name__)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


class _StderrHandler(logging.Handler):
    """Writes to ``sys.stderr`` as it is at each record (tests and callers may replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if "tqdm" in sys.modules:  # a bar may be live: tqdm clears and redraws it around the line
                from tqdm import tqdm

                tqdm.write(text, file=sys.stderr)
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:  # logging must never break the run
            self.handleError(record)


HANDLER = _StderrHandler()
HANDLER.setFormatter(_Formatter())


def install() -> bool:
    """Show castseg's messages on stderr as the CLI does: attach :data:`HANDLER` to the ``castseg``
    logger (once), at level INFO unless a level was set. True when it attached it, False when it
    was there already. Scripts (benchmarks/, tools/) call it at their entry point."""
    root = logging.getLogger(ROOT)
    if HANDLER in root.handlers:
        return False
    root.addHandler(HANDLER)
    root.propagate = False  # or every record would print twice where the root logger has a handler
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return True


def uninstall() -> None:
    """Undo :func:`install`: no :data:`HANDLER`, records propagate again (the level is the caller's)."""
    root = logging.getLogger(ROOT)
    root.removeHandler(HANDLER)
    root.propagate = True


def set_verbosity(quiet: bool = False, verbose: bool = False) -> int:
    """The CLI's ``--quiet`` (warnings and errors only, no progress) / ``--verbose`` (debug too).
    Returns the level it replaced."""
    install()
    root = logging.getLogger(ROOT)
    before = root.level
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not progress_enabled():
        # the hub's and transformers' download / "Loading weights" bars follow ours (read at their import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return before


def progress_enabled(stream: TextIO | None = None) -> bool:
    """A live bar only on a terminal, when castseg logs INFO (not ``--quiet``), and not when
    ``CASTSEG_NO_PROGRESS=1``. ``stream`` defaults to the *current* ``sys.stderr``."""
    if os.environ.get("CASTSEG_NO_PROGRESS", "") not in ("", "0"):
        return False
    if not logging.getLogger(ROOT).isEnabledFor(logging.INFO):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Progress of ``total`` items: a tqdm bar on a terminal; elsewhere an INFO line
    ``[desc] n/total unit, rate, eta`` once ``every`` more items are done (default: a tenth of
    ``total``) and at least ``min_interval`` seconds (default ``CASTSEG_PROGRESS_SECONDS``, 5)
    passed since the last line — so a short loop writes nothing — and a last line at
    :meth:`close` if any was written.

    ``enabled=False`` (e.g. ranks other than 0) shows nothing. ``initial`` items were done before
    (a resumed pass). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True,
                 every: int | None = None, min_interval: float | None = None):
        self.total, self.desc, self.unit, self.initial = int(total), desc, unit, int(initial)
        self.n = self.last_n = self.initial
        self.enabled = enabled and logger.isEnabledFor(logging.INFO)
        self.every = max(1, every or math.ceil(self.total / 10))
        self.min_interval = float(os.environ.get("CASTSEG_PROGRESS_SECONDS") or 5.0) if min_interval is None \
            else min_interval
        self.start = self.last_time = time.monotonic()
        self.lines = 0
        self.bar = None
        if self.enabled and progress_enabled():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.n - self.last_n >= self.every and \
                time.monotonic() - self.last_time >= self.min_interval:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else math.inf
        logger.info(f"[{self.desc}] {self.n}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
                    f"eta {format_eta(eta)}")
        self.last_n, self.last_time, self.lines = self.n, now, self.lines + 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines and self.n != self.last_n:
            self._line()
        self.enabled = False  # closing twice writes nothing more

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, **kw: object) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)``)."""
    with Progress(len(items) if total is None else total, desc, **kw) as bar:  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.update(1)
