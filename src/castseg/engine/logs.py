"""What a training run reports: progress bar / log lines, ``log.csv``, TensorBoard, val metrics.

Files under the run directory (rank 0 only):

- ``log.csv``: one row every ``log_every`` steps: ``step, lr, <loss terms>..., grad_norm,
  sec_per_step, time`` (values are means over the steps since the previous row — or since the
  resume, for the first row after one; ``lr`` is the largest group's lr at the row's step;
  ``time`` is the seconds spent in training steps so far, across resumes).
- ``tensorboard/``: the same scalars (``train/<term>``, ``train/lr``) and ``val/<metric>``.
- ``val_metrics.jsonl``: one line per validation ``{"step", <metric>...}``; ``val_metrics.json``:
  ``{"metric", "mode", "last": {...}, "best": {...}}``.

On resume, rows/lines after the checkpoint's step (written before the kill, then lost from the
trajectory) are dropped, and TensorBoard purges events after it, so the logs read as one run.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from castseg.atomic import atomic_open, atomic_write_text
from castseg.console import format_eta, progress_enabled
from castseg.data.coco_io import write_json

CSV_NAME = "log.csv"
VAL_JSONL = "val_metrics.jsonl"
VAL_JSON = "val_metrics.json"
TB_DIR = "tensorboard"
logger = logging.getLogger(__name__)


def _fmt(v: float) -> str:
    return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4f}"


def _is_better(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


class TrainLogger:
    """Progress, CSV, TensorBoard and validation records of one stage.

    ``enabled=False`` (ranks other than 0) makes every method a no-op. ``start_step`` is the
    step training resumes from (0 fresh); ``fresh=True`` deletes the previous run's logs.
    """

    def __init__(self, run_dir: Path, name: str, max_steps: int, log_every: int, start_step: int = 0,
                 fresh: bool = True, enabled: bool = True, elapsed: float = 0.0, best_metric: str = "AP",
                 best_mode: str = "max", tensorboard: bool = True):
        self.run_dir, self.name, self.max_steps, self.log_every = Path(run_dir), name, max_steps, log_every
        self.enabled, self.best_metric, self.best_mode = enabled, best_metric, best_mode
        self.elapsed = elapsed
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.window_time = 0.0
        self.last_row: dict[str, float] = {}
        self.val_history: list[dict[str, Any]] = []
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            for p in (CSV_NAME, VAL_JSONL, VAL_JSON):
                (self.run_dir / p).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / TB_DIR, ignore_errors=True)
        else:
            self._truncate(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)
            except ImportError as e:  # tensorboard is a dependency; a broken install must not stop training
                warnings.warn(f"TensorBoard logging disabled ({e})", stacklevel=2)
        if progress_enabled():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc=name, file=sys.stderr, dynamic_ncols=True,
                            unit="it", smoothing=0.1)

    # --- resume bookkeeping ---

    def _truncate(self, step: int) -> None:
        path = self.run_dir / CSV_NAME
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            fields = list(rows[0].keys()) if rows else []
            keep = [r for r in rows if _as_int(r.get("step")) <= step]
            if rows and len(keep) < len(rows):
                self._write_csv(fields, keep)
        path = self.run_dir / VAL_JSONL
        if path.is_file():
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            recs = []
            for ln in lines:
                try:
                    recs.append(json.loads(ln))
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
            self.val_history = [r for r in recs if isinstance(r, dict) and _as_int(r.get("step")) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.val_history))
            self._write_val_summary()

    def _write_csv(self, fields: list[str], rows: list[dict[str, Any]]) -> None:
        with atomic_open(self.run_dir / CSV_NAME, newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    # --- training steps ---

    def step(self, step: int, terms: dict[str, float], lr: float, seconds: float) -> None:
        """Record optimizer step ``step`` (1-based count of steps done) and its loss terms."""
        if not self.enabled:
            return
        self.elapsed += seconds
        self.window_time += seconds
        self.window_steps += 1
        for k, v in terms.items():
            self.window[k] = self.window.get(k, 0.0) + v
        if self.bar is not None:
            shown = {k: _fmt(v) for k, v in terms.items() if k in ("loss",) or k.startswith("loss_")}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        if step % self.log_every == 0 or step == self.max_steps:
            self._flush(step, lr)

    def _flush(self, step: int, lr: float) -> None:
        n = max(self.window_steps, 1)
        row = {"step": step, "lr": lr, **{k: v / n for k, v in self.window.items()},
               "sec_per_step": self.window_time / n, "time": round(self.elapsed, 3)}
        self.window, self.window_steps, self.window_time = {}, 0, 0.0
        self.last_row = row
        self._append_csv(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is None:
            eta = row["sec_per_step"] * (self.max_steps - step)
            terms = " ".join(f"{k} {_fmt(v)}" for k, v in row.items()
                             if k not in ("step", "lr", "sec_per_step", "time"))
            logger.info(f"[{self.name}] step {step}/{self.max_steps} {terms} lr {row['lr']:.2e} "
                        f"{row['sec_per_step']:.2f}s/it eta {format_eta(eta)}")

    def _append_csv(self, row: dict[str, Any]) -> None:
        path = self.run_dir / CSV_NAME
        fields = list(row)
        if path.is_file() and path.stat().st_size:
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if set(fields) <= set(header):
                with open(path, "a", newline="", encoding="utf-8") as f:
                    csv.DictWriter(f, fieldnames=header, extrasaction="ignore").writerow(row)
                return
            # A loss term appeared that earlier rows lack: rewrite with the union of columns.
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            tail = ["sec_per_step", "time"]
            union = [k for k in dict.fromkeys(header + fields) if k not in tail] + tail
            self._write_csv(union, rows + [row])
            return
        self._write_csv(fields, [row])

    # --- validation ---

    def val(self, step: int, metrics: dict[str, Any]) -> bool:
        """Record a validation; True when it is the best so far by ``best_metric``."""
        if not self.enabled:
            return False
        rec = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}}
        prev_best = self.best()
        self.val_history.append(rec)
        with open(self.run_dir / VAL_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self._write_val_summary()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"val/{k}", v, step)
            self.tb.flush()
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in rec.items()
                         if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool))
        self.message(f"[{self.name}] val @ step {step}: {shown}")
        value = rec.get(self.best_metric)
        return isinstance(value, (int, float)) and (prev_best is None or
                                                    _is_better(value, prev_best[self.best_metric], self.best_mode))

    def best(self) -> dict[str, Any] | None:
        scored = [r for r in self.val_history if isinstance(r.get(self.best_metric), (int, float))]
        if not scored:
            return None
        best = scored[0]
        for r in scored[1:]:
            if _is_better(r[self.best_metric], best[self.best_metric], self.best_mode):
                best = r
        return best

    def last_val(self) -> dict[str, Any] | None:
        return self.val_history[-1] if self.val_history else None

    def _write_val_summary(self) -> None:
        write_json({"metric": self.best_metric, "mode": self.best_mode, "last": self.last_val(),
                    "best": self.best()}, self.run_dir / VAL_JSON, indent=1)

    def message(self, text: str) -> None:
        if self.enabled:
            logger.info(text)  # castseg.console writes it above a live bar

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _as_int(v: Any) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return -1
