"""`castseg run` end to end on a handful of embedded DSB images with tiny presets."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from castseg import cli
from castseg.data.coco_io import load_coco
from castseg.engine import find_checkpoint
from castseg.engine.checkpointing import weights_sha256
from castseg.models import load_checkpoint


def test_run_writes_every_stage_metrics_and_report(tiny_run, capsys, monkeypatch):
    """`castseg.run` (its docstring example, run as a doctest) then `castseg run` again."""
    import doctest

    import castseg.api.pipeline

    runs = Path("runs")  # as the example gives it: relative to the working directory, tiny_run
    monkeypatch.chdir(tiny_run)
    outcome = doctest.testmod(castseg.api.pipeline, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted >= 4 and outcome.failed == 0
    run_dir = runs / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 3 steps from random weights: no mask reaches IoU 0.5 on the 2 val images, every row is 0 (the
    # stand-ins' rows, which do score, are pinned in test_demo); each row names its stage's checkpoint
    assert metrics["teacher_zero_shot"]["AP"] == metrics["teacher_zero_shot"]["AP50"] == 0.0
    for key, stage in (("teacher_adapted", "adapt/c"), ("student_supervised", "supervised"),
                       ("student_distilled", "distill"), ("student_refined", "refine")):
        assert metrics[key]["AP"] == metrics[key]["AP50"] == 0.0, key
        assert metrics[key]["checkpoint"] == str(run_dir / stage / "checkpoints" / "last"), key
    # the stages chain: (a) and (c) both adapt θ_T⁰, distill and supervised start from the same θ_s⁰,
    # refine from the distilled student
    start = {s: find_checkpoint(run_dir / s / "checkpoints" / "last").state["inputs"]["initial_weights"]
             for s in ("adapt/a", "adapt/c", "distill", "refine", "supervised")}
    assert start["adapt/a"] == start["adapt/c"] == weights_sha256(load_checkpoint(tiny_run / "teacher")[0])
    assert start["distill"] == start["supervised"] != start["adapt/a"]
    distilled = weights_sha256(load_checkpoint(run_dir / "distill" / "checkpoints" / "last")[0])
    assert start["refine"] == distilled != start["distill"]
    for stage in ("adapt/a", "adapt/c", "distill", "refine", "supervised"):
        assert (run_dir / stage / "log.csv").is_file(), stage
        assert (run_dir / stage / "checkpoints" / "last" / "model.json").is_file(), stage
    assert (run_dir / "pseudo_labels" / "teacher.json").is_file()
    assert (run_dir / "config.yaml").is_file()
    page = (run_dir / "report.html").read_text()
    assert "<table>" in page and "teacher (adapted)" in page and "student (refined)" in page
    assert page.count("data:image/png;base64") >= 4  # curves + teacher/student overlays
    assert "student, CAST refined" in (run_dir / "report.md").read_text()
    # the run hands over one student: named last in metrics.json and the report, exported to deploy/
    rec = metrics["recommendation"]
    assert list(metrics)[-1] == "recommendation" and rec["model"] == "student_refined"  # 0.0 AP each: a tie
    assert rec["files"] == {"checkpoint": str(run_dir / "deploy" / "model"), "onnx": str(run_dir / "deploy" / "model.onnx")}
    assert sorted(p.name for p in (run_dir / "deploy" / "model").iterdir()) == ["model.json", "model.safetensors"]
    assert "## What to deploy" in (run_dir / "report.md").read_text() and "premise not met" in rec["reading"]
    assert metrics["teacher_selection"]["chosen"] == "adapt_c"  # every teacher 0.0 AP: the paper's θ_T''
    # a re-run skips every finished stage and reproduces the metrics
    capsys.readouterr()
    assert cli.main(["run", str(tiny_run / "tiny.yaml"), "--runs", str(runs)]) == 0
    assert "finished earlier with the same settings, reused" in capsys.readouterr().err
    again = json.loads((run_dir / "metrics.json").read_text())
    # efficiency holds latencies, measured again on every run; everything else must be identical
    assert set(again.pop("efficiency")) == set(metrics.pop("efficiency")) == {"teacher (adapted)", "student (refined)"}
    assert again["recommendation"].pop("latency_ms") > 0 and metrics["recommendation"].pop("latency_ms") > 0
    assert again == metrics


def run_with_teacher(tiny_run, name: str, teacher: dict) -> tuple:
    """`castseg run` on tiny.yaml with another teacher section (and 2 adaptation steps):
    ``(run_dir, metrics)``."""
    cfg = yaml.safe_load((tiny_run / "tiny.yaml").read_text())
    cfg["teacher"] = teacher
    cfg["adapt"] = {"train": {"max_steps": 2}}
    (tiny_run / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    import castseg

    result = castseg.run(tiny_run / f"{name}.yaml", runs=tiny_run / "runs")
    assert result.metrics == json.loads((result.run_dir / "metrics.json").read_text())
    return result.run_dir, result.metrics


def test_run_with_an_ensemble_of_two_teachers(tiny_run):
    """`castseg run` with teacher: {type: ensemble}: both members adapt on their own loss, the
    adapted ensemble is saved as one teacher (teacher.yaml + members) that pseudo-labels D_u."""
    from castseg.models import StudentConfig, build_student, save_checkpoint

    second = build_student(StudentConfig.from_preset("tiny", num_queries=20, dec_layers=1))
    save_checkpoint(tiny_run / "teacher2", second, None, ["nucleus"], step=0)
    members = [{"type": "checkpoint", "path": str(tiny_run / t)} for t in ("teacher", "teacher2")]
    run_dir, metrics = run_with_teacher(tiny_run, "ens", {"type": "ensemble", "weights": [1.0, 0.5],
                                                          "mask_nms_iou": 0.5, "members": members})
    saved = run_dir / "adapt" / "c" / "teacher"
    assert metrics["teacher_adapted"]["checkpoint"] == str(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["member0", "member1", "teacher.yaml"]
    spec = yaml.safe_load((saved / "teacher.yaml").read_text())["teacher"]
    assert spec["type"] == "ensemble" and spec["weights"] == [1.0, 0.5]
    header = (run_dir / "adapt" / "a" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"member0_loss_ce", "member1_loss_ce"} <= set(header)  # each member trained
    manifest = json.loads((run_dir / "pseudo_labels" / "teacher.json.manifest.json").read_text())
    assert manifest["teacher"]["config"]["type"] == "ensemble"
    for key in ("teacher_zero_shot", "teacher_adapted", "student_distilled", "student_refined", "student_supervised"):
        assert metrics[key]["AP"] == metrics[key]["AP50"] == 0.0, key  # random weights, 2-3 steps


def test_run_with_the_grounded_sam_teacher(tiny_run):
    """The whole pipeline with the paper's composite teacher (tiny random weights, the real
    from_pretrained path): zero-shot eval, adaptation a/c on its own loss, pseudo-labels from the
    saved adapted teacher folder, distillation, refinement, report."""
    from castseg.models.tiny_teacher import save_tiny_grounded_sam

    folder = save_tiny_grounded_sam(tiny_run / "gsam", ["nucleus"], box_threshold=0.0, text_threshold=0.0,
                                    max_detections=10)
    run_dir, metrics = run_with_teacher(tiny_run, "gsam", {"type": "grounded_sam", "path": str(folder)})
    for key in ("teacher_zero_shot", "teacher_adapted", "student_supervised", "student_distilled", "student_refined"):
        assert metrics[key]["AP"] == metrics[key]["AP50"] == 0.0, key  # random weights, 2-3 steps
    assert metrics["teacher_adapted"]["checkpoint"] == str(run_dir / "adapt" / "c" / "teacher")
    assert (run_dir / "adapt" / "c" / "teacher" / "teacher.json").is_file()
    assert (run_dir / "pseudo_labels" / "adapt_a.json").is_file()
    log = (run_dir / "adapt" / "a" / "log.csv").read_text().splitlines()
    assert "loss_det" in log[0].split(",") and len(log) == 3  # header + 2 steps
    assert "teacher (adapted)" in (run_dir / "report.md").read_text()


def test_run_scores_pseudo_labels_and_restarts_changed_stages(tiny_run, capsys):
    from castseg.data.coco_io import read_json
    from castseg.eval.pseudo_label_quality import label_quality
    from castseg.run_checks import premise_ratio, pseudo_label_ap

    runs, gt = tiny_run / "runs", tiny_run / "splits" / "unlabeled_gt.json"
    base = ["run", str(tiny_run / "tiny.yaml"), "--runs", str(runs), "--unlabeled-gt", str(gt),
            "adapt.teacher_selection=paper"]
    assert cli.main(base) == 0
    run_dir = runs / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the paper's rule: distil from θ_T'' whatever the val APs say
    assert metrics["teacher_selection"]["chosen"] == "adapt_c" and "paper keeps" in metrics["teacher_selection"]["reason"]
    from castseg.pseudo_labels import read_manifest

    assert read_manifest(run_dir / "pseudo_labels" / "teacher.json")["teacher"]["spec"] == \
        str(run_dir / "adapt" / "c" / "checkpoints" / "last")
    truth = load_coco(gt)
    assert [im["id"] for im in truth.images] == [im["id"] for im in load_coco(tiny_run / "splits" / "unlabeled.json",
                                                                              require_annotations=False).images]
    pseudo = metrics["pseudo_labels"]
    assert pseudo["ground_truth"] == str(gt) and pseudo["num_images"] == len(truth.images)
    for key, name in (("adapt_a", "adapt_a.json"), ("teacher", "teacher.json")):
        file = run_dir / "pseudo_labels" / name
        assert pseudo[key] == {**pseudo_label_ap(truth, file, 100), "file": str(file),
                               "quality": label_quality(truth, read_json(file), 0.3)}, key
    assert "premise_ratio" in metrics and metrics["premise_ratio"] == premise_ratio(metrics)
    out = capsys.readouterr().out
    assert "pseudo-labels of adapt/a: AP" in out and "premise: adapted teacher / supervised-only" in out

    # a changed distill budget: refused by default, with one line naming the change and the way out
    changed = [*base, "distill.train.max_steps=4"]
    assert cli.main(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # only the last is the error; before it, each reused stage and stage 1's choice of teacher
    assert len(err) - 1 == sum("finished earlier" in e or "reused" in e or "teacher for distillation" in e for e in err)
    assert "other settings (max_steps 3 -> 4)" in err[-1] and "--restart-changed" in err[-1]
    assert cli.main([*changed, "--restart-changed"]) == 0
    err = capsys.readouterr().err
    for stage in ("adapt/a", "adapt/c", "supervised"):
        assert f"[{stage}] finished earlier with the same settings, reused" in err, stage
    assert f"[distill] settings changed since the earlier run (max_steps 3 -> 4), starting over (the earlier run " \
           f"is kept in {run_dir / 'distill.stale-1'})" in err
    # refine starts from the distilled student, which was redone
    assert "[refine] settings changed since the earlier run (initial_weights changed), starting over" in err
    assert len((run_dir / "distill" / "log.csv").read_text().splitlines()) == 5  # header + 4 steps
    assert (run_dir / "distill.stale-1" / "checkpoints" / "last" / "model.json").is_file()

    # cleaning the pseudo-labels changes what every stage that learns from them sees (stage 1c,
    # distill) and what the quality row counts; the supervised-only student is untouched
    from castseg.pseudo_labels.clean import Cleanup, clean_records

    assert cli.main([*changed, "--restart-changed", "loss.pseudo_label_overlaps=exclusive"]) == 0
    err = capsys.readouterr().err
    for stage in ("adapt/c", "distill"):
        assert f"[{stage}] settings changed since the earlier run" in err, stage
    assert "[supervised] finished earlier with the same settings, reused" in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    file = run_dir / "pseudo_labels" / "teacher.json"
    assert metrics["pseudo_labels"]["teacher"]["quality"] == label_quality(
        truth, clean_records(read_json(file), Cleanup(overlaps="exclusive"), 0.3), 0.3)


def test_run_unlabeled_gt_errors_are_one_line_before_training(tiny_run, capsys):
    runs = tiny_run / "runs"
    base = ["run", str(tiny_run / "tiny.yaml"), "--runs", str(runs)]
    assert cli.main([*base, "--unlabeled-gt", str(tiny_run / "nope.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"castseg run: error: {tiny_run / 'nope.json'}: unlabeled_gt (--unlabeled-gt): no such file "
                   "(expected the unlabeled images' own annotations, e.g. castseg split's unlabeled_gt.json)"]
    # the val set's annotations are not the unlabeled images'
    assert cli.main([*base, "--unlabeled-gt", str(tiny_run / "splits" / "val.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val.json: its images differ from the unlabeled set" in err[0]
    assert "unlabeled.json" in err[0]
    assert not (runs / "tiny" / "adapt").exists()  # nothing trained


def test_teachers_run_on_the_runs_device(tiny_run, monkeypatch):
    """θ_T⁰ and every pseudo-labelling teacher used to stay on the CPU (`load_teacher(...,
    device="cpu")`) while the student trained on the GPU: hours per pass at Cityscapes size.
    They now go where the trainer's model goes (here a fake device: the meta one)."""
    import pytest
    import torch

    from castseg import stages
    from castseg.config import load_config
    from castseg.engine.distributed import DistInfo

    cfg = load_config(tiny_run / "tiny.yaml")
    monkeypatch.setattr(stages, "run_dist", lambda cfg: DistInfo(device=torch.device("meta")))
    teacher, _ = stages.initial_teacher(cfg)
    assert {p.device.type for p in teacher.parameters()} == {"meta"}
    seen = []

    def load_teacher(path, device="cpu", **kw):
        seen.append(str(device))
        raise RuntimeError("stop here")

    monkeypatch.setattr(stages, "load_teacher", load_teacher)
    with pytest.raises(RuntimeError, match="stop here"):
        stages.pseudo_label(tiny_run / "teacher", cfg, tiny_run / "pl.json")
    assert seen == ["meta"]
