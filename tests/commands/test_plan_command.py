"""`castseg plan CONFIG`: per-stage memory and GFLOPs, offline, hub ids through the known configs."""

import json
from pathlib import Path

import pytest

from castseg import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cityscapes_plan():
    """The paper recipe's plan (Grounding DINO-B + SAM2.1-L teacher, DINOv2-S student), once:
    replaying the teacher on the meta device takes most of a minute on 2 cores."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["plan", str(ROOT / "configs" / "cityscapes_10pct.yaml"), "--json"]) == 0
    return json.loads(out.getvalue())


def test_plan_of_the_paper_recipe(cityscapes_plan):
    from castseg.plan import format_plan

    stages = cityscapes_plan["stages"]
    assert list(stages) == ["adapt/a", "adapt/c", "pseudo-label", "distill", "refine", "supervised"]
    for row in stages.values():
        m = row["memory"]
        assert m["total"] == m["weights"] + m["gradients"] + m["optimizer"] + m["activations"] > 0
        assert row["gflops_per_step"] > 0
    assert abs(stages["distill"]["params"] - 52e6) / 52e6 < 0.15        # DINOv2-S student, paper: 52M
    assert stages["adapt/a"]["params"] > 8 * stages["distill"]["params"]  # the teacher
    assert stages["distill"]["batch"] == 8 and stages["refine"]["batch"] == 4
    assert stages["adapt/c"]["memory"]["activations"] > stages["adapt/a"]["memory"]["activations"]
    assert stages["pseudo-label"]["memory"]["optimizer"] == 0
    assert "not measured" in cityscapes_plan["data"]["measured"]
    text = format_plan(cityscapes_plan)
    assert "GFLOPs/step" in text and "distill" in text and "amp bf16" in text


def test_plan_prints_a_table_and_measures_the_data(tiny_run, capsys):
    assert cli.main(["plan", str(tiny_run / "tiny.yaml"), "train.batch_size=1"]) == 0
    out = capsys.readouterr().out
    for stage in ("adapt/a", "adapt/c", "pseudo-label", "distill", "refine", "supervised"):
        assert stage in out
    assert "per step per worker" in out and "GFLOPs/step" in out


def test_plan_of_a_missing_teacher_checkpoint_is_one_line(tiny_run, capsys):
    assert cli.main(["plan", str(tiny_run / "tiny.yaml"), f"teacher.path={tiny_run / 'nowhere'}"]) == 2
    assert "no model.json" in capsys.readouterr().err


@pytest.mark.parametrize("gpu", [True, False])
def test_a_fresh_run_starts_with_the_plan_on_a_gpu(tiny_run, monkeypatch, caplog, gpu):
    """`castseg run` logs each stage's estimate first when it will run on a GPU (the replay costs
    10-40 s of CPU, so a CPU run gets a one-line pointer instead). Stages stubbed out: this is
    about what comes before them."""
    import logging

    import torch

    from castseg import stages
    from castseg.commands import pipeline

    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    monkeypatch.setattr("castseg.device.resolve_device", lambda spec="auto", local_rank=None: device)
    monkeypatch.setattr(stages, "run_all", lambda *args, **kwargs: {})
    monkeypatch.setattr(pipeline, "print_summary", lambda metrics, with_premise: None)
    with caplog.at_level(logging.INFO, logger="castseg"):
        assert cli.main(["run", str(tiny_run / "tiny.yaml"), "--runs", str(tiny_run / "runs")]) == 0
    text = caplog.text
    if gpu:
        assert "plan (estimated" in text and "GiB peak per GPU process" in text and "distill" in text
    else:
        assert "plan (estimated" not in text and "`castseg plan CONFIG` estimates" in text
