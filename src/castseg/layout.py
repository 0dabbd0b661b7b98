"""One run folder's layout: every stage folder and file of ``runs/NAME`` is named here only.

::

    runs/NAME/
      config.yaml            the resolved config
      metrics.json           every model's row (stages, pseudo-labels, premise, efficiency)
      report.md / .html      the report
      adapt/a, adapt/c       stage 1 (θ_T', θ_T''), each a Trainer folder (checkpoints/, logs)
      adapt/zero_shot/       θ_T⁰ as a teacher config (what distillation reads if it is chosen)
      adapt/selection/       labeled images held out to choose the teacher on (runs without val)
      distill, refine        stages 2 and 3
      supervised             the supervised-only baseline from θ_s⁰
      deploy/                the recommended student: model/ (checkpoint) and model.onnx
      pseudo_labels/KEY.json caches (adapt_a: made by θ_T'; teacher: by θ_T''; imported)

A Trainer folder holds ``checkpoints/last`` (and ``best``); a teacher with its own format (e.g.
Grounding DINO + SAM2) is saved beside it as ``teacher/``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

ADAPT_A, ADAPT_C, DISTILL, REFINE, SUPERVISED = "adapt/a", "adapt/c", "distill", "refine", "supervised"
STAGES = (ADAPT_A, ADAPT_C, DISTILL, REFINE, SUPERVISED)
# pseudo-label cache keys (file stems under pseudo_labels/) → the stage whose teacher made them
PSEUDO_LABEL_SOURCES = {"adapt_a": ADAPT_A, "teacher": ADAPT_C, "imported": "given cache"}


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (nothing is created by asking)."""

    root: Path

    @classmethod
    def of(cls, where: Union[str, Path, "RunLayout"]) -> "RunLayout":
        """A layout from a run folder (or the layout itself)."""
        return where if isinstance(where, RunLayout) else cls(Path(where))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def stage(self, name: str) -> Path:
        """A stage's Trainer folder (``name`` one of :data:`STAGES`)."""
        return self.root / name

    def checkpoint(self, name: str) -> Path:
        """The stage's last checkpoint."""
        return self.stage(name) / "checkpoints" / "last"

    def teacher_folder(self, name: str) -> Path:
        """Where a teacher with its own save format is written after the stage."""
        return self.stage(name) / "teacher"

    def trained_model(self, name: str) -> Path:
        """What a stage hands on: its teacher folder where there is one, else its checkpoint."""
        folder = self.teacher_folder(name)
        return folder if folder.is_dir() else self.checkpoint(name)

    @property
    def deploy(self) -> Path:
        return self.root / "deploy"

    @property
    def zero_shot_teacher(self) -> Path:
        return self.root / "adapt" / "zero_shot" / "teacher.yaml"

    @property
    def selection_dir(self) -> Path:
        return self.root / "adapt" / "selection"

    def pseudo_labels(self, key: str) -> Path:
        """A pseudo-label cache (``key``: one of :data:`PSEUDO_LABEL_SOURCES`)."""
        return self.root / "pseudo_labels" / f"{key}.json"

    def existing_stages(self) -> dict[str, Path]:
        """Stage name → folder, for the stages that have a folder."""
        return {name: self.stage(name) for name in STAGES if self.stage(name).is_dir()}
