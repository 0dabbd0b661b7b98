"""castseg's public Python API: the functions every ``castseg`` command calls.

Keyword-only where options are many; each returns plain Python objects (paths, dicts, dataclasses)
and raises :class:`castseg.errors.CastsegError` (one line naming the file and the problem) on bad
input. ``import castseg`` exposes every name here lazily (``castseg.load``, ``castseg.run`` ...),
so importing the package stays cheap.
"""

from __future__ import annotations

from castseg.api.data import convert, evaluate, pseudo_label, split
from castseg.predictor import Instances, Model, load
from castseg.api.pipeline import RunResult, adapt, distill, refine, run
from castseg.api.tools import describe, plan

__all__ = ["Instances", "Model", "RunResult", "adapt", "convert", "describe", "distill", "evaluate", "load", "plan",
           "pseudo_label", "refine", "run", "split"]
