"""The models a run scores: each ``metrics.json`` key, its label, and whose size it has.

One table for every place that lists them — the report's model table, the demo's printed table,
the DSB protocol's rendered tables — in the order of the method (METHOD.md, Table 1 analogue),
the training-free classical reference last.
"""

from __future__ import annotations

from typing import NamedTuple


class ModelRow(NamedTuple):
    key: str  # key in metrics.json
    label: str  # what the tables print
    network: str | None  # "teacher" / "student": whose params and latency apply; None: no network


MODEL_ROWS: tuple[ModelRow, ...] = (
    ModelRow("teacher_zero_shot", "zero-shot teacher", "teacher"),
    ModelRow("teacher_adapted", "teacher, CAST adaptation", "teacher"),
    ModelRow("student_supervised", "student, supervised only", "student"),
    ModelRow("student_distilled", "student, CAST distillation", "student"),
    ModelRow("student_refined", "student, CAST refined", "student"),
    # benchmarks/dsb_protocol.py's ``oracle``: supervised on every train image's own labels
    ModelRow("student_oracle", "student, oracle (all train labels)", "student"),
    ModelRow("classical_baseline", "classical Otsu + watershed", None),
)
