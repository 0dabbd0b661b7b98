"""The run report: one table of every model, efficiency, per-stage training curves, overlays.

`write_report(run_dir, metrics, ...)` writes ``report.md`` and ``report.html``; the HTML is one
self-contained file (plots and overlays inlined as base64 PNG) that opens offline. The curves —
loss terms, the pixel contrastive loss's Δ and FNR monitors, val mask AP — come from each
stage's ``log.csv`` and ``val_metrics.jsonl`` (written by the engine) and are drawn with
matplotlib's Agg backend, one figure per stage; nothing here trains or evaluates.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from castseg.model_rows import MODEL_ROWS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def read_val(path: Path) -> dict[str, list[float]]:
    """Columns of an engine ``val_metrics.jsonl`` (one validation a line) as float lists; lines
    cut by a kill and non-numeric values are skipped, missing metrics → NaN."""
    if not path.is_file():
        return {}
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    recs = [r for r in recs if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]
    keys = dict.fromkeys(k for r in recs for k, v in r.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    return {k: [float(r[k]) if isinstance(r.get(k), (int, float)) else float("nan") for r in recs] for k in keys}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


Series = dict[str, tuple[Sequence[float], Sequence[float]]]  # {legend name: (steps, values)}
Panel = tuple[str, Series]  # (y-axis label, series)

# Monitors of the pixel contrastive loss (METHOD.md): each on its own axes, their scales differ.
MONITORS = (("pxl_margin", "margin Δ (pos − neg sim)"), ("pxl_fnr", "false-negative rate"))
VAL_CURVES = ("AP", "AP50")
DPI = 100
PANEL_SIZE = (520, 260)  # pixels per panel; figures are two panels wide


def stage_panels(stage_dir: Path) -> list[Panel]:
    """The curves of one stage folder: loss terms, the Δ/FNR monitors, val mask AP — each that
    has a value (refine logs the ``pxl_*`` columns of distill blank: it has no pixel loss)."""
    log, val = read_log(stage_dir / "log.csv"), read_val(stage_dir / "val_metrics.jsonl")
    log = log if "step" in log else {}
    steps, val_steps = log.get("step", []), val.get("step", [])
    panels: list[Panel] = [("loss", {k: (steps, v) for k, v in log.items() if k.startswith("loss")})]
    panels += [(label, {k: (steps, log[k])}) for k, label in MONITORS if k in log]
    panels.append(("val mask AP", {f"val {k}": (val_steps, val[k]) for k in VAL_CURVES if k in val}))
    panels = [(y, {n: xy for n, xy in series.items() if np.isfinite(xy[1]).any()}) for y, series in panels]
    return [(y, series) for y, series in panels if series]


def curves_figure(panels: Sequence[Panel], title: str, size: tuple[int, int] | None = None) -> "Figure":
    """A matplotlib figure (no pyplot state) of ``panels`` in a two-column grid: x axis "step",
    y axis the panel's quantity, the legend right of its axes (never over the lines). ``size``
    in pixels; default :data:`PANEL_SIZE` per panel."""
    from matplotlib.figure import Figure

    cols = 1 if len(panels) <= 1 else 2
    rows = max(1, -(-len(panels) // cols))
    w, h = size or (PANEL_SIZE[0] * 2, PANEL_SIZE[1] * rows)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    fig.suptitle(title)
    if not panels:
        fig.text(0.5, 0.5, "no data", ha="center", va="center", color="gray")
        return fig
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (ylabel, series) in zip(axes, panels):
        _draw_panel(ax, ylabel, series)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def _draw_panel(ax: Any, ylabel: str, series: Series) -> None:
    from matplotlib.ticker import MaxNLocator

    steps = []
    for name, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if np.isfinite(y)]
        steps += [p[0] for p in pts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 12 else None,
                markersize=3, linewidth=1.5, label=name)
    if steps and min(steps) == max(steps):  # one validation: a step either side, not 2.84 … 3.16
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def figure_png(fig: "Figure") -> bytes:
    """``fig`` rendered by the Agg backend as PNG bytes (size: ``fig``'s size in pixels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def plot_curves(panels: Sequence[Panel], title: str, size: tuple[int, int] | None = None) -> bytes:
    """:func:`curves_figure` as PNG bytes."""
    return figure_png(curves_figure(panels, title, size))


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
    for key, label, _ in MODEL_ROWS:
        m = metrics.get(key)
        if isinstance(m, dict):
            rows.append([label, _fmt(m.get("AP")), _fmt(m.get("AP50")), str(m.get("checkpoint", "—"))])
    return rows


def pseudo_label_table(metrics: dict[str, Any]) -> list[list[str]] | None:
    """The pseudo-label caches scored against the unlabeled images' own annotations; None when
    the run had none (``data.unlabeled_gt`` unset)."""
    from castseg.run_checks import PSEUDO_LABEL_SOURCES, quality_text

    pseudo = metrics.get("pseudo_labels") or {}
    rows = [["made by teacher", "mask AP", "AP50", "L_semi's instances (matched at IoU 0.5)", "file"]]
    for key, stage in PSEUDO_LABEL_SOURCES.items():
        if isinstance(pseudo.get(key), dict):
            m = pseudo[key]
            quality = quality_text(m["quality"]) if m.get("quality") else "—"
            rows.append([stage, _fmt(m.get("AP")), _fmt(m.get("AP50")), quality, str(m.get("file", "—"))])
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


def verdict_lines(metrics: dict[str, Any]) -> list[str]:
    """Which teacher was distilled from and why, the student to deploy and the table's reading."""
    from castseg.recommendation import recommendation_text

    lines = []
    sel = metrics.get("teacher_selection")
    if isinstance(sel, dict):
        lines.append(f"distilled from {sel['chosen']} ({sel['checkpoint']}): {sel['reason']} [val: {sel['val']}]")
    if "recommendation" in metrics:
        rec = metrics["recommendation"]
        lines.append(recommendation_text(rec))
        if rec:
            lines.append(rec["reading"])
    return lines


def write_report(run_dir: str | Path, metrics: dict[str, Any], efficiency: dict[str, dict[str, Any]] | None = None,
                 stages: Sequence[str] = ("adapt", "distill", "refine"),
                 overlays: Sequence[tuple[str, bytes]] = (), title: str = "castseg run") -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``run_dir``.

    Args:
        metrics: the run's ``metrics.json`` content (keys of :data:`castseg.model_rows.MODEL_ROWS`; with
            ``pseudo_labels`` also their AP on the unlabeled images; the premise ratio is
            computed from ``teacher_adapted`` and ``student_supervised``).
        efficiency: ``{model name: {"params", "gflops", "latency_ms"}}``.
        stages: stage folders under ``run_dir`` whose ``log.csv`` gives the curves.
        overlays: ``(caption, PNG bytes)`` pairs, e.g. teacher and student side by side.
    """
    run_dir = Path(run_dir)
    plots: list[tuple[str, bytes]] = []
    for stage in stages:
        panels = stage_panels(run_dir / stage)
        if panels:
            plots.append((f"{stage}: training curves", plot_curves(panels, f"{stage}: training curves")))
    from castseg.run_checks import premise_text

    premise, tables = premise_text(metrics), report_tables(metrics, efficiency)
    verdict = verdict_lines(metrics)
    md = [f"# {title}", "", premise, ""]
    for name, rows in tables:
        md += [f"## {name}", "", _md_table(rows), ""]
    if verdict:
        md += ["## What to deploy", "", *[f"- {line}" for line in verdict], ""]
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
    if verdict:
        parts += ["<h2>What to deploy</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in verdict] + ["</ul>"]
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
