"""The paper's recipe as users run it: the shipped configs, hub model ids (from a fake hub cache
of tiny random models), `amp: bf16` with the fused sampler, one process and torchrun.

Only data paths, sizes and step counts differ from the shipped files (conftest.SIZES / STEPS);
:func:`assert_recipe_kept` checks the resolved config says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rehearsal_harness import (CITYSCAPES_CLASSES, CUSTOM_CLASSES, RUN_ROWS, SIZES, STAGES, STEPS, TEACHER_SIZES,
                               castseg, cityscapes_overrides, data_overrides, read_yaml, shipped, traced_writes, tree)


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def assert_recipe_kept(resolved: Path, config: Path, overrides: list[str]) -> dict:
    """Every value the shipped ``config`` sets is in the run's resolved config, except the
    overridden keys (data paths, sizes, steps)."""
    got = read_yaml(resolved)
    flat = _leaves(got)
    over = {o.partition("=")[0] for o in overrides}
    for key, want in _leaves(read_yaml(config)).items():
        if key in over:
            continue
        have = flat.get(key)
        if isinstance(want, list) and isinstance(have, (list, tuple)):
            have = list(have)
        assert have == want, f"{key}: resolved {have!r}, shipped {want!r}"
    return got


def assert_rows(metrics: dict, rows=RUN_ROWS) -> None:
    missing = [r for r in rows if not isinstance(metrics.get(r), dict)]
    assert not missing, f"metrics.json lacks {missing}; has {sorted(metrics)}"
    for r in rows:
        ap = metrics[r].get("AP")
        assert isinstance(ap, float) and 0.0 <= ap <= 1.0 and math.isfinite(ap), (r, metrics[r])


# --- a. configs/cityscapes_10pct.yaml: `castseg run`, one process, bf16 + fused sampler ----------


def test_cityscapes_recipe_runs_every_stage_in_one_process(hub_env, cityscapes_split, tmp_path):
    config = shipped("cityscapes_10pct.yaml")
    overrides = cityscapes_overrides(cityscapes_split)
    work = tmp_path / "work"
    castseg(["run", config, *overrides, "--runs", "runs", "--unlabeled-gt", cityscapes_split["unlabeled_gt"]],
            hub_env, work)
    run = work / "runs" / "cityscapes_10pct"
    resolved = assert_recipe_kept(run / "config.yaml", config, overrides)
    assert resolved["train"]["amp"] == "bf16" and resolved["loss"]["sampler"] == "fused"
    assert resolved["teacher"]["detector"] == "IDEA-Research/grounding-dino-base"
    assert resolved["model"]["preset"] == "small"
    metrics = json.loads((run / "metrics.json").read_text())
    assert_rows(metrics)
    assert metrics["premise_ratio"] is None or math.isfinite(metrics["premise_ratio"])
    assert {"adapt_a", "teacher"} <= set(metrics["pseudo_labels"])
    for stage in STAGES:
        assert (run / stage / "checkpoints" / "last").is_dir(), stage
    for stage in ("adapt/a", "adapt/c"):  # the grounded-SAM teacher, saved in its own format
        saved = json.loads((run / stage / "teacher" / "teacher.json").read_text())
        assert saved["class_names"] == CITYSCAPES_CLASSES, saved
    assert (run / "report.html").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing written beside the run


# --- b. configs/teacher_grounded_sam.yaml: `pseudo-label --teacher` and `distill --teacher` ------


def test_teacher_config_pseudo_labels_and_distills_the_cityscapes_student(hub_env, cityscapes_split, tmp_path):
    """`castseg pseudo-label --teacher configs/teacher_grounded_sam.yaml` (the file unchanged),
    then `castseg distill --teacher` with the same file: distill finds the cache the command made
    (same teacher, images and options) and trains on it instead of labelling again."""
    config = shipped("cityscapes_10pct.yaml")
    overrides = cityscapes_overrides(cityscapes_split)
    work = tmp_path / "work"
    run = work / "runs" / "cityscapes_10pct"
    cache = run / "pseudo_labels" / "teacher.json"
    max_size = next(o for o in overrides if o.startswith("pseudo_labels.max_size=")).partition("=")[2]
    castseg(["pseudo-label", "--teacher", shipped("teacher_grounded_sam.yaml"), "--images",
             cityscapes_split["unlabeled"], "--out", cache, "--max-size", max_size], hub_env, work)
    manifest = json.loads(cache.with_name(cache.name + ".manifest.json").read_text())
    n = len(json.loads(Path(cityscapes_split["unlabeled"]).read_text())["images"])
    assert manifest["num_images"] == n, manifest
    ids = {c["id"] for c in json.loads(Path(cityscapes_split["labeled"]).read_text())["categories"]}
    assert all(r["category_id"] in ids for r in json.loads(cache.read_text()))
    proc = castseg(["distill", config, *overrides, "--runs", "runs", "--teacher", shipped("teacher_grounded_sam.yaml")],
                   hub_env, work)
    assert "finished earlier with the same teacher and images, reused" in proc.stderr
    assert_recipe_kept(run / "config.yaml", config, overrides)
    metrics = json.loads((run / "metrics.json").read_text())
    assert_rows(metrics, ("student_distilled",))
    assert (run / "distill" / "checkpoints" / "last").is_dir()


# --- c. configs/custom_example.yaml: a checkpoint teacher, `castseg run` -------------------------


def test_custom_example_runs_every_stage_with_a_checkpoint_teacher(hub_env, custom_split, tmp_path):
    import torch

    from castseg.models import StudentConfig, build_student, save_checkpoint

    torch.manual_seed(0)
    teacher = build_student(StudentConfig.from_preset("tiny", num_classes=len(CUSTOM_CLASSES), num_queries=20))
    save_checkpoint(tmp_path / "teachers" / "my_teacher", teacher, teacher.config.to_dict(), CUSTOM_CLASSES, step=0)
    config = shipped("custom_example.yaml")
    overrides = [*data_overrides(custom_split), f"teacher.path={tmp_path / 'teachers' / 'my_teacher'}",
                 *SIZES, *STEPS]
    work = tmp_path / "work"
    castseg(["run", config, *overrides, "--runs", "runs", "--unlabeled-gt", custom_split["unlabeled_gt"]],
            hub_env, work)
    run = work / "runs" / "custom_example"
    resolved = assert_recipe_kept(run / "config.yaml", config, overrides)
    assert resolved["model"]["preset"] == "small" and resolved["model"]["num_classes"] == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert_rows(metrics)
    for stage in STAGES:
        assert (run / stage / "checkpoints" / "last").is_dir(), stage


# --- d. `castseg demo --pretrained --quick`: the hub ids of castseg/demo.py ----------------------


def test_demo_pretrained_quick_runs_on_the_hub_models(hub_env, tmp_path):
    from castseg.demo import PRETRAINED_STUDENT, PRETRAINED_TEACHER
    from castseg.model_rows import MODEL_ROWS

    work = tmp_path / "work"
    # sizes only: smaller training crops, mask points, decoder and detector input (the steps are
    # --quick's); the model/teacher overrides apply on top of the hub sections --pretrained fills in
    sizes = [s for s in SIZES if s.startswith(("model.", "loss."))] + TEACHER_SIZES
    proc = castseg(["demo", "--pretrained", "--quick", "--out", "demo", "data.crop_size=[64,128]", "train.batch_size=1",
                    "data.unlabeled_batch_size=1", "eval.max_size=128", "pseudo_labels.max_size=128", *sizes],
                   hub_env, work, timeout=600)
    out = work / "demo"
    resolved = read_yaml(out / "config.yaml")
    assert resolved["model"]["dec_layers"] == 2 and resolved["teacher"]["detector_size"] == [64, 128]
    assert resolved["teacher"]["detector"] == PRETRAINED_TEACHER["detector"]
    assert resolved["teacher"]["segmenter"] == PRETRAINED_TEACHER["segmenter"]
    assert resolved["model"]["encoder_name"] == PRETRAINED_STUDENT["encoder_name"]
    assert resolved["model"]["pretrained"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert_rows(metrics)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the AP of each table row
    assert set(summary) == {k for k, _, _ in MODEL_ROWS if (metrics.get(k) or {}).get("AP") is not None}
    assert set(RUN_ROWS) - {"teacher_adapted_a"} <= set(summary)
    assert (out / "report.html").is_file()


# --- e. torchrun --nproc_per_node 2: the cityscapes recipe, all stages --------------------------


def test_cityscapes_recipe_under_torchrun_keeps_ranks_in_sync_and_writes_once(hub_env, cityscapes_split, tmp_path):
    config = shipped("cityscapes_10pct.yaml")
    overrides = cityscapes_overrides(cityscapes_split)
    work = tmp_path / "work"
    hashes, trace = tmp_path / "rank_weights", tmp_path / "trace"
    site = tmp_path / "site"
    site.mkdir()
    trace.mkdir()
    from rehearsal_harness import WRITE_TRACER

    (site / "sitecustomize.py").write_text(WRITE_TRACER)
    env = {**hub_env, "CASTSEG_DEBUG_RANK_WEIGHTS_DIR": str(hashes), "CASTSEG_TRACE_ROOT": str(work),
           "CASTSEG_TRACE_DIR": str(trace),
           "PYTHONPATH": str(site) + (":" + hub_env["PYTHONPATH"] if hub_env.get("PYTHONPATH") else "")}
    castseg(["run", config, *overrides, "--runs", "runs", "--unlabeled-gt", cityscapes_split["unlabeled_gt"]],
            env, work, timeout=600, torchrun=2)
    run = work / "runs" / "cityscapes_10pct"
    assert_recipe_kept(run / "config.yaml", config, overrides)
    # every stage's ranks end with the same weights
    for stage in STAGES:
        name = stage.replace("/", "_")
        ranks = [(hashes / f"{name}.rank{r}.sha256").read_text().strip() for r in (0, 1)]
        assert len(ranks[0]) == 64 and ranks[0] == ranks[1], f"{stage}: ranks differ {ranks}"
    # only rank 0 writes under the working folder. Rank 1 may create a folder rank 0 creates too
    # (`mkdir(exist_ok=True)`: nothing appears that rank 0 would not make) and its pseudo-label
    # shards (`<cache>.parts/`, by design; with 3-4 unlabeled images in one chunk it has none).
    rank0, rank1 = traced_writes(trace, 0), traced_writes(trace, 1)
    assert rank0, "the write tracer saw nothing: is sitecustomize.py loaded?"
    made_by_0 = {p for e, p in rank0 if e == "os.mkdir"}
    extra = [(e, p) for e, p in rank1 if ".parts" not in p and not (e == "os.mkdir" and p in made_by_0)]
    assert not extra, "rank 1 wrote:\n" + "\n".join(f"{e} {p}" for e, p in extra[:20])
    metrics_writes = [p for e, p in rank0 if Path(p).name.startswith("metrics.json")]
    assert metrics_writes, "rank 0 never wrote metrics.json"
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    assert not [p for p in tree(run) if "rank1" in p or "rank_1" in p]
    metrics = json.loads((run / "metrics.json").read_text())
    assert_rows(metrics)
    assert {"adapt_a", "teacher"} <= set(metrics["pseudo_labels"])
    for stage in STAGES:
        assert (run / stage / "checkpoints" / "last").is_dir(), stage
    assert (run / "report.html").is_file()
