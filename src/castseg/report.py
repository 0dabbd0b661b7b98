"""The run report: one table of every model, efficiency, loss and Δ/FNR curves, overlays.

`write_report(run_dir, metrics, ...)` writes ``report.md`` and ``report.html``; the HTML is one
self-contained file (plots and overlays inlined as base64 PNG) that opens offline. Curves come
from each stage's ``log.csv`` (written by the engine); nothing here trains or evaluates.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Rows of the table, in the order of the method (METHOD.md, Table 1 analogue).
MODEL_ROWS = [
    ("teacher_zero_shot", "zero-shot teacher"),
    ("teacher_adapted", "teacher, CAST adaptation"),
    ("student_supervised", "student, supervised only"),
    ("student_distilled", "student, CAST distillation"),
    ("student_refined", "student, CAST refined"),
]


def read_log(path: Path) -> dict[str, list[float]]:
    """Columns of an engine ``log.csv`` as float lists (missing or blank cells → NaN)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else float("nan"))
            except ValueError:
                cols.setdefault(k, []).append(float("nan"))
    return cols


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
                size: tuple[int, int] = (520, 260)) -> bytes:
    """A line plot (PIL only: no matplotlib dependency) of ``{name: (x, y)}`` as PNG bytes."""
    w, h = size
    pad_l, pad_r, pad_t, pad_b = 48, 110, 22, 24
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((pad_l, 4), title, fill="black")
    pts = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys) if np.isfinite(y)]
    if not pts:
        d.text((pad_l, h // 2), "no data", fill="gray")
        return _png(img)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    box = (pad_l, pad_t, w - pad_r, h - pad_b)
    d.rectangle(box, outline="black")
    d.text((2, pad_t), f"{y1:.3g}", fill="black")
    d.text((2, h - pad_b - 10), f"{y0:.3g}", fill="black")
    d.text((pad_l, h - pad_b + 4), f"{x0:g}", fill="black")
    d.text((w - pad_r - 30, h - pad_b + 4), f"{x1:g}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
    for i, (name, (xs, ys)) in enumerate(series.items()):
        c = colours[i % len(colours)]
        line = [(box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]), box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))
                for x, y in zip(xs, ys) if np.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=c, width=2)
        elif line:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=c)
        d.text((w - pad_r + 6, pad_t + 14 * i), name[:16], fill=c)
    return _png(img)


def overlay(image: np.ndarray, masks: np.ndarray, title: str = "") -> bytes:
    """``uint8 [H,W,3]`` image with ``bool [K,H,W]`` masks in distinct colours, as PNG bytes."""
    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)  # fixed palette: the same instance order gets the same colours
    for m in masks:
        colour = rng.integers(40, 256, 3).astype(np.float32)
        out[m] = 0.45 * out[m] + 0.55 * colour
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if title:
        d = ImageDraw.Draw(img)
        d.rectangle([0, 0, 8 + 6 * len(title), 14], fill="black")
        d.text((4, 2), title, fill="white")
    return _png(img)


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and v == v else "—"


def model_table(metrics: dict[str, Any]) -> list[list[str]]:
    rows = [["model", "mask AP", "AP50", "checkpoint"]]
    for key, label in MODEL_ROWS:
        m = metrics.get(key)
        if isinstance(m, dict):
            rows.append([label, _fmt(m.get("AP")), _fmt(m.get("AP50")), str(m.get("checkpoint", "—"))])
    return rows


def pseudo_label_table(metrics: dict[str, Any]) -> list[list[str]] | None:
    """The pseudo-label caches scored against the unlabeled images' own annotations; None when
    the run had none (``data.unlabeled_gt`` unset)."""
    from castseg.run_checks import PSEUDO_LABEL_SOURCES

    pseudo = metrics.get("pseudo_labels") or {}
    rows = [["made by teacher", "mask AP", "AP50", "file"]]
    for key, stage in PSEUDO_LABEL_SOURCES.items():
        if isinstance(pseudo.get(key), dict):
            m = pseudo[key]
            rows.append([stage, _fmt(m.get("AP")), _fmt(m.get("AP50")), str(m.get("file", "—"))])
    return rows if len(rows) > 1 else None


def efficiency_table(eff: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = [["model", "params (M)", "GFLOPs", "latency (ms)"]]
    for name, e in eff.items():
        rows.append([name, _fmt(e.get("params", float("nan")) / 1e6, 2), _fmt(e.get("gflops"), 1),
                     _fmt(e.get("latency_ms"), 1)])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_tables(metrics: dict[str, Any], efficiency: dict[str, dict[str, Any]] | None
                  ) -> list[tuple[str, list[list[str]]]]:
    """``(heading, rows)`` of every table the run has numbers for."""
    tables = [("Models (val)", model_table(metrics))]
    pseudo = pseudo_label_table(metrics)
    if pseudo:
        info = metrics["pseudo_labels"]
        tables.append((f"Pseudo-labels ({info.get('num_images')} unlabeled images vs their own annotations, "
                       f"{info.get('ground_truth')}; never trained on)", pseudo))
    if efficiency:
        tables.append(("Efficiency (same input)", efficiency_table(efficiency)))
    return tables


def write_report(run_dir: str | Path, metrics: dict[str, Any], efficiency: dict[str, dict[str, Any]] | None = None,
                 stages: Sequence[str] = ("adapt", "distill", "refine"),
                 overlays: Sequence[tuple[str, bytes]] = (), title: str = "castseg run") -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``run_dir``.

    Args:
        metrics: the run's ``metrics.json`` content (keys of :data:`MODEL_ROWS`; with
            ``pseudo_labels`` also their AP on the unlabeled images; the premise ratio is
            computed from ``teacher_adapted`` and ``student_supervised``).
        efficiency: ``{model name: {"params", "gflops", "latency_ms"}}``.
        stages: stage folders under ``run_dir`` whose ``log.csv`` gives the curves.
        overlays: ``(caption, PNG bytes)`` pairs, e.g. teacher and student side by side.
    """
    run_dir = Path(run_dir)
    plots: list[tuple[str, bytes]] = []
    for stage in stages:
        log = read_log(run_dir / stage / "log.csv")
        if "step" not in log:
            continue
        steps = log["step"]
        losses = {k: (steps, v) for k, v in log.items() if k.startswith("loss")}
        if losses:
            plots.append((f"{stage}: losses", plot_curves(losses, f"{stage}: loss terms")))
        monitors = {k: (steps, v) for k, v in log.items() if k in ("pxl_margin", "pxl_fnr")}
        if monitors:
            plots.append((f"{stage}: Δ and FNR", plot_curves(monitors, f"{stage}: margin Δ, false-negative rate")))
    from castseg.run_checks import premise_text

    premise, tables = premise_text(metrics), report_tables(metrics, efficiency)
    md = [f"# {title}", "", premise, ""]
    for name, rows in tables:
        md += [f"## {name}", "", _md_table(rows), ""]
    if plots or overlays:
        md += ["Curves and overlays are in report.html.", ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))

    def img_tag(png: bytes, alt: str) -> str:
        return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">' \
               f"<figcaption>{html.escape(alt)}</figcaption></figure>"

    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='premise'>{html.escape(premise)}</p>"]
    for name, rows in tables:
        parts += [f"<h2>{html.escape(name)}</h2>", _html_table(rows)]
    if plots:
        parts += ["<h2>Training curves</h2>"] + [img_tag(p, n) for n, p in plots]
    if overlays:
        parts += ["<h2>Predictions</h2>"] + [img_tag(p, n) for n, p in overlays]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 8px}figure{display:inline-block;margin:6px}")
    html_path = run_dir / "report.html"
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return md_path, html_path
