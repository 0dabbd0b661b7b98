"""Pseudo-label cache: generate once, threshold on read, resume after a kill, shard under
torchrun, round-trip through evaluation, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from castseg import cli
from castseg.api import data as api
from castseg.data.transforms import resample
from castseg.errors import InputError
from castseg.eval.results import write_results
from castseg.models import StudentConfig, build_student, load_checkpoint, save_checkpoint
from castseg.models.inference import postprocess_instances, to_coco_results
from castseg.models.teacher import Teacher
from castseg.pseudo_labels import (PseudoLabeledDataset, generate_pseudo_labels, load_pseudo_labels, load_teacher,
                                   manifest_path, parts_dir, read_manifest)
from castseg.models.loading import _walk_config

H, W = 32, 40
SCORES = (0.9, 0.5, 0.2)
INFO = {"sha256": "fake-teacher-v1", "config": {"type": "fake"}}


class FakeTeacher(Teacher):
    """Three rectangles per image (scores 0.9 / 0.5 / 0.2), shifted by the image's brightness so
    images differ; counts images seen and, with ``fail_after``, dies like a killed process."""

    def __init__(self, fail_after: int | None = None):
        super().__init__(["blob"])
        self.calls, self.fail_after = 0, fail_after

    def _predict(self, images, class_names):
        out = []
        for img in images:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("killed")
            self.calls += 1
            s = int(img.mean() * 10) % 4
            masks = torch.zeros(3, *img.shape[-2:], dtype=torch.bool)
            masks[0, s:s + 8, s:s + 8] = True                  # top-left
            masks[1, 20 + s:28 + s, 28:36] = True              # bottom-right
            masks[2, 10:14, 10 + s:30] = True
            out.append({"masks": masks, "scores": torch.tensor(SCORES), "labels": torch.zeros(3, dtype=torch.int64)})
        return out


def write_images(root: Path, n: int, annotations: list | None = None, size=(H, W)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        name = f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": 100 + i, "file_name": name, "height": size[0], "width": size[1]})
    data = {"images": images, "categories": [{"id": 7, "name": "blob"}]}
    if annotations is not None:
        data["annotations"] = annotations
    (root / "images.json").write_text(json.dumps(data))
    return root / "images.json"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_student(StudentConfig.from_preset("tiny", num_classes=1, dec_layers=2, num_queries=10))
    path = tmp_path_factory.mktemp("ckpt") / "teacher"
    save_checkpoint(path, model, None, ["blob"], step=0)
    return path


def run_cli(args: list[str]) -> int:
    return cli.main(["pseudo-label", "--no-progress", *map(str, args)])


# ---------------------------------------------------------------- thresholds on read

def test_generate_once_threshold_on_read(tmp_path):
    images = write_images(tmp_path / "data", 5)
    teacher = FakeTeacher()
    out = tmp_path / "p.json"
    m = generate_pseudo_labels(teacher, images, out, teacher_info=INFO, chunk_size=2, min_score=0.05, progress=False)
    assert teacher.calls == 5
    assert m["finished"] and m["num_images"] == 5 and m["num_instances"] == 15 and m["min_score"] == 0.05
    assert m["categories"] == [{"id": 7, "name": "blob"}] and m["teacher_sha256"] == "fake-teacher-v1"
    assert manifest_path(out).is_file() and not parts_dir(out).exists()   # parts merged away

    loose, strict = load_pseudo_labels(out, images, 0.3), load_pseudo_labels(out, images, 0.6)
    assert sum(len(v["scores"]) for v in loose.values()) == 10
    assert sum(len(v["scores"]) for v in strict.values()) == 5
    assert sorted(loose) == [100, 101, 102, 103, 104] and loose[100]["category_ids"] == [7, 7]

    ds = PseudoLabeledDataset(images, out, score_threshold=0.3)
    item = ds[0]
    assert item["masks"].shape == (2, H, W) and item["masks"].dtype == torch.bool
    assert item["labels"].tolist() == [0, 0] and item["weights"].tolist() == [1.0, 1.0]
    assert item["image"].shape == (3, H, W) and item["valid"].all() and not item["ignore"].any()
    weighted = PseudoLabeledDataset(images, out, score_threshold=0.1, weight_by_score=True, strong_view=True)[1]
    assert torch.allclose(weighted["weights"], torch.tensor(SCORES)) and weighted["image_strong"].shape == (3, H, W)
    # a rerun of the same generation finds the finished cache: no teacher call
    generate_pseudo_labels(teacher, images, out, teacher_info=INFO, chunk_size=2, progress=False)
    assert teacher.calls == 5


def test_dataset_transform_keeps_weights_aligned(tmp_path):
    images = write_images(tmp_path / "data", 1)
    out = tmp_path / "p.json"
    generate_pseudo_labels(FakeTeacher(), images, out, teacher_info=INFO, progress=False)

    def crop_top_left(sample):  # the bottom-right instance (score 0.5) leaves the crop
        return resample(sample, (H, W), window=(0, 0, 16, 16))

    item = PseudoLabeledDataset(images, out, score_threshold=0.1, transform=crop_top_left, weight_by_score=True)[0]
    assert item["masks"].shape[1:] == (16, 16) and len(item["labels"]) == 2
    assert torch.allclose(item["weights"], torch.tensor([0.9, 0.2]))


# ---------------------------------------------------------------- resume

def test_killed_pass_resumes_where_it_stopped(tmp_path):
    images = write_images(tmp_path / "data", 5)
    ref = tmp_path / "ref.json"
    generate_pseudo_labels(FakeTeacher(), images, ref, teacher_info=INFO, chunk_size=2, batch_size=1, progress=False)

    out = tmp_path / "p.json"
    with pytest.raises(RuntimeError, match="killed"):   # dies on image 4, inside chunk 1
        generate_pseudo_labels(FakeTeacher(fail_after=3), images, out, teacher_info=INFO, chunk_size=2,
                               batch_size=1, progress=False)
    assert sorted(p.name for p in parts_dir(out).iterdir()) == ["part-000000.json"]
    assert not out.exists() and not json.loads(manifest_path(out).read_text())["finished"]
    with pytest.raises(InputError, match="did not finish"):
        load_pseudo_labels(out, images)

    with pytest.raises(InputError, match="teacher_sha256"):   # another teacher may not resume it
        generate_pseudo_labels(FakeTeacher(), images, out, teacher_info={**INFO, "sha256": "other"}, chunk_size=2,
                               progress=False)
    again = FakeTeacher()
    generate_pseudo_labels(again, images, out, teacher_info=INFO, chunk_size=2, batch_size=1, progress=False)
    assert again.calls == 3                                   # chunk 0 (2 images) was not redone
    assert out.read_bytes() == ref.read_bytes()

    fresh = FakeTeacher()
    generate_pseudo_labels(fresh, images, out, teacher_info={**INFO, "sha256": "other"}, chunk_size=2,
                           overwrite=True, progress=False)
    assert fresh.calls == 5 and read_manifest(out)["teacher_sha256"] == "other"


def test_restart_changed_sets_another_teachers_cache_aside(tmp_path, capsys):
    images = write_images(tmp_path / "data", 3)
    out = tmp_path / "pl" / "adapt_a.json"
    generate_pseudo_labels(FakeTeacher(), images, out, teacher_info=INFO, progress=False)
    first = out.read_bytes()
    capsys.readouterr()
    same = FakeTeacher()
    generate_pseudo_labels(same, images, out, teacher_info=INFO, progress=False, restart_changed=True)
    assert same.calls == 0
    assert "[pseudo-labels adapt_a.json] finished earlier with the same teacher and images, reused" in \
        capsys.readouterr().err
    retrained = FakeTeacher()
    generate_pseudo_labels(retrained, images, out, teacher_info={**INFO, "sha256": "fake-teacher-v2"},
                           progress=False, restart_changed=True)
    aside = tmp_path / "pl" / "adapt_a.stale-1.json"
    assert f"[pseudo-labels adapt_a.json] made earlier with a different teacher_sha256, starting over (the " \
           f"earlier cache is kept as {aside})" in capsys.readouterr().err
    assert retrained.calls == 3 and read_manifest(out)["teacher_sha256"] == "fake-teacher-v2"
    # the earlier cache is intact, with its manifest beside it: still a readable cache
    assert aside.read_bytes() == first and read_manifest(aside)["teacher_sha256"] == "fake-teacher-v1"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "adapt_a.json", "adapt_a.json.manifest.json", "adapt_a.stale-1.json", "adapt_a.stale-1.json.manifest.json"]


# ---------------------------------------------------------------- real teachers, CLI

def test_round_trip_eval_matches_own_predictions(tmp_path, tiny_ckpt):
    """The cache of a model (a checkpoint path), evaluated as COCO results, scores the AP of its own
    predictions."""
    images = write_images(tmp_path / "data", 3, size=(48, 64))
    model, _ = load_checkpoint(tiny_ckpt)
    preds, annotations = [], []
    for img in json.loads(images.read_text())["images"]:
        x = torch.from_numpy(np.array(Image.open(images.parent / img["file_name"]))).permute(2, 0, 1)[None] / 255
        with torch.no_grad():
            out = model(x.float())
        inst = postprocess_instances(out["pred_logits"], out["pred_masks"], [(48, 64)], [(48, 64)])[0]
        recs = to_coco_results(inst, img["id"], [7])
        preds += recs
        # GT = the model's two best non-empty masks, so the AP is well above 0
        for r in [r for r in recs if r["bbox"][2] > 0][:2]:
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": 7,
                                "segmentation": r["segmentation"], "iscrowd": 0})
    gt = write_images(tmp_path / "data", 3, annotations, size=(48, 64))
    write_results(preds, tmp_path / "own.json")
    manifest = api.pseudo_label(tiny_ckpt, images=gt, out=tmp_path / "p.json", min_score=0, batch_size=1,
                                progress=False)
    assert manifest["finished"] and manifest["teacher_sha256"]
    own, cached = api.evaluate(tmp_path / "own.json", gt), api.evaluate(tmp_path / "p.json", gt)
    assert own["AP"] > 0.1 and cached == own


def test_teacher_config_yaml_and_fingerprint(tmp_path, tiny_ckpt):
    cfg = tmp_path / "cfgs" / "teacher.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"teacher:\n  type: checkpoint\n  path: {os.path.relpath(tiny_ckpt, cfg.parent)}\n"
                   "  postprocess_kwargs: {topk: 5}\n")
    teacher, info = load_teacher(cfg)
    assert teacher.class_names == ["blob"] and teacher.postprocess_kwargs == {"topk": 5}
    meta = json.loads((tiny_ckpt / "model.json").read_text())
    assert info["weights"] == {"teacher/model.safetensors": meta["weights"]["sha256"]}
    cfg.write_text(cfg.read_text().replace("topk: 5", "topk: 6"))
    assert load_teacher(cfg)[1]["sha256"] != info["sha256"]  # options change the outputs: a new cache
    assert load_teacher(tiny_ckpt)[1]["weights"] == {"model.safetensors": meta["weights"]["sha256"]}
    # grounded-SAM options may name local model folders (hashed, left out of the config) or hub ids (kept)
    (tmp_path / "cfgs" / "dino").mkdir()
    found: list = []
    resolved, stripped = _walk_config({"type": "grounded_sam", "detector": "dino", "segmenter": "facebook/sam2"},
                                      cfg.parent, cfg, found)
    assert found == [cfg.parent / "dino"] and resolved["detector"] == str(cfg.parent / "dino")
    assert stripped == {"type": "grounded_sam", "segmenter": "facebook/sam2"}
    with pytest.raises(InputError, match="nowhere"):
        _walk_config({"type": "checkpoint", "path": "nowhere"}, cfg.parent, cfg, [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_match_single_process(tmp_path, tiny_ckpt):
    images = write_images(tmp_path / "data", 5, size=(48, 64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers: the same float arithmetic, so identical files
    try:
        api.pseudo_label(tiny_ckpt, images=images, out=tmp_path / "one.json", chunk_size=1, min_score=0,
                         progress=False)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "castseg.cli", "pseudo-label", "--no-progress",
                           "--teacher", str(tiny_ckpt), "--images", str(images), "--out", str(tmp_path / "two.json"),
                           "--chunk-size", "1", "--min-score", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes)" in proc.stderr  # a message: logged on stderr
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    counts = [read_manifest(tmp_path / f"{n}.json")["num_instances"] for n in ("one", "two")]
    assert counts[0] == counts[1]


# ---------------------------------------------------------------- bad input

def test_bad_inputs_are_one_line_errors(tmp_path, tiny_ckpt, capsys):
    images = write_images(tmp_path / "data", 3)
    out = tmp_path / "p.json"

    def error(args):
        assert run_cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("castseg pseudo-label: error:")
        return err

    assert "missing.json" in error(["--teacher", tiny_ckpt, "--images", tmp_path / "missing.json", "--out", out])
    assert "no-such-teacher" in error(["--teacher", tmp_path / "no-such-teacher", "--images", images, "--out", out])
    (tmp_path / "broken.json").write_text("{not json")
    assert "broken.json" in error(["--teacher", tiny_ckpt, "--images", tmp_path / "broken.json", "--out", out])
    (images.parent / "im1.png").write_bytes(b"\x89PNG not really")
    assert "im1.png" in error(["--teacher", tiny_ckpt, "--images", images, "--out", out])
