import base64
import re

import numpy as np
from PIL import Image

from castseg.report import overlay, plot_curves, read_log, write_report


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
    assert len(pngs) == 3  # loss curves, Δ/FNR curves, one overlay
    for p in pngs:
        (tmp_path / "x.png").write_bytes(base64.b64decode(p))
        Image.open(tmp_path / "x.png").verify()


def test_log_with_blank_cells_and_plot_without_data(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss\n1,\n2,0.5\n")
    log = read_log(tmp_path / "log.csv")
    assert np.isnan(log["loss"][0]) and log["loss"][1] == 0.5
    assert plot_curves({}, "empty").startswith(b"\x89PNG")
