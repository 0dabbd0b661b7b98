import base64
import io
import re

import numpy as np
from PIL import Image

from castseg.report import (curves_figure, figure_png, overlay, plot_curves, read_log, read_val, stage_panels,
                            write_report)


def test_report_is_self_contained_with_table_curves_and_overlays(tmp_path):
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "log.csv").write_text(
        "step,lr,loss,loss_sup,pxl_margin,pxl_fnr\n1,0.1,3.0,2.0,0.1,0.2\n2,0.1,2.0,1.5,0.3,0.1\n3,0.1,1.0,,0.5,0.05\n")
    metrics = {"teacher_zero_shot": {"AP": 0.1, "AP50": 0.2, "checkpoint": "t.json"},
               "student_refined": {"AP": 0.3, "AP50": 0.5, "checkpoint": "s.json"}}
    img = np.full((20, 30, 3), 200, np.uint8)
    masks = np.zeros((1, 20, 30), bool)
    masks[0, 5:10, 5:15] = True
    md, page = write_report(tmp_path, metrics, {"teacher": {"params": 5e8, "gflops": 880.0, "latency_ms": 350.9}},
                            overlays=[("student", overlay(img, masks, "student"))])
    text = md.read_text()
    assert "| zero-shot teacher | 0.100 | 0.200 | t.json |" in text
    assert "| student, CAST refined | 0.300 | 0.500 | s.json |" in text
    assert "CAST adaptation" not in text  # rows without numbers are left out, not invented
    doc = page.read_text()
    assert "http" not in doc.replace("<!doctype html>", "")  # opens offline: nothing external
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', doc)
    assert len(pngs) == 2  # one figure for the one stage with curves (distill), one overlay
    assert re.findall(r'<figcaption>([^<]+)</figcaption>', doc) == ["distill: training curves", "student"]
    for p in pngs:
        (tmp_path / "x.png").write_bytes(base64.b64decode(p))
        Image.open(tmp_path / "x.png").verify()
    assert Image.open(io.BytesIO(base64.b64decode(pngs[0]))).size == (1040, 520)  # 3 panels: 2 rows of 2


def test_stage_panels_group_losses_monitors_and_val_ap(tmp_path):
    (tmp_path / "log.csv").write_text("step,lr,loss,loss_sup,pxl_margin,pxl_fnr,grad_norm\n"
                                      "1,0.1,3.0,2.0,0.1,0.2,5\n2,0.1,2.0,,0.3,0.1,4\n")
    (tmp_path / "val_metrics.jsonl").write_text('{"step": 2, "AP": 0.25, "AP50": 0.5, "tag": "x"}\n{"step": 4, "AP')
    panels = stage_panels(tmp_path)
    assert [(y, list(s)) for y, s in panels] == [
        ("loss", ["loss", "loss_sup"]), ("margin Δ (pos − neg sim)", ["pxl_margin"]),
        ("false-negative rate", ["pxl_fnr"]), ("val mask AP", ["val AP", "val AP50"])]
    assert panels[-1][1]["val AP"] == ([2.0], [0.25])  # the line cut by a kill is skipped
    assert read_val(tmp_path / "missing.jsonl") == {} and stage_panels(tmp_path / "none") == []


def test_curves_figure_labels_axes_and_legends_with_the_series_names(tmp_path):
    panels = [("loss", {"loss": ([1, 2, 3], [3.0, float("nan"), 1.0]), "loss_sup": ([1, 2, 3], [2.0, 1.5, 1.0])}),
              ("val mask AP", {"val AP": ([2], [0.25])})]
    fig = curves_figure(panels, "distill: training curves")
    assert fig.get_suptitle() == "distill: training curves"
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes] == [("step", "loss"), ("step", "val mask AP")]
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes] == [["loss", "loss_sup"], ["val AP"]]
    assert list(axes[0].lines[0].get_xdata()) == [1.0, 3.0]  # NaN (blank cell) points are dropped, not drawn
    assert len(axes[0].get_yticklabels()) > 1
    for ax in axes:  # no step 1.5, also around a single validation
        assert all(float(t).is_integer() for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1])
    figure_png(fig)  # lays the figure out: legends right of their axes, inside the image
    for ax in axes:
        box, legend = ax.get_window_extent(), ax.get_legend().get_window_extent()
        assert box.x1 <= legend.x0 and legend.x1 <= fig.bbox.width
    png = plot_curves(panels, "t", size=(600, 300))
    assert Image.open(io.BytesIO(png)).size == (600, 300)


def test_log_with_blank_cells_and_plot_without_data(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss\n1,\n2,0.5\n")
    log = read_log(tmp_path / "log.csv")
    assert np.isnan(log["loss"][0]) and log["loss"][1] == 0.5
    png = plot_curves([], "empty")
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (1040, 260)


def test_stage_panels_leave_out_columns_without_values(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss,loss_pxl,pxl_margin,pxl_fnr\n10,2.0,,,\n20,1.0,,,\n")
    assert stage_panels(tmp_path) == [("loss", {"loss": ([10.0, 20.0], [2.0, 1.0])})]


def test_model_table_labels_come_from_the_one_row_table():
    from castseg.model_rows import MODEL_ROWS
    from castseg.report import model_table

    metrics = {row.key: {"AP": 0.5, "AP50": 0.75} for row in MODEL_ROWS}
    assert [r[0] for r in model_table(metrics)[1:]] == [row.label for row in MODEL_ROWS]
    assert model_table({"classical_baseline": {"AP": 0.07, "AP50": 0.17}})[1] == [
        "classical Otsu + watershed", "0.070", "0.170", "—"]
