"""The paper's recipe at the paper's size, a few steps of every stage: what a GPU user will meet.

configs/cityscapes_10pct.yaml as shipped (Grounding DINO-B + SAM2.1-L teacher, DINOv2-S student,
crop 512x1024, batch 4, bf16, fused sampler), with only paths, step counts and the image set
changed: random-initialised hub models written to a hub cache (castseg.models.hub_cache; no
network, no weights needed) and synthetic 1024x2048 images with rectangles of the 8 classes.
Every stage runs in this process through castseg.stages (the path `castseg run` takes), timed
and measured per stage:

- seconds per step (median after the first step), images per second (batch x world size / step),
- the data loader's share of a step (time spent waiting for the next batch / step time),
- peak GPU memory (torch.cuda.max_memory_allocated) against `castseg plan`'s estimate,
- the teacher's and the student's latency on one 1024x2048 val image (the report's efficiency
  rows; the paper: 350.9 -> 76.9 ms on its GPU).

Random weights make the APs meaningless; the numbers are about cost. Results: ``OUT/results.json``
and ``OUT/results.md`` (also printed).

    python benchmarks/gpu_paper_recipe.py --out runs/gpu_paper            # on the GPU machine
    python benchmarks/gpu_paper_recipe.py --size tiny --image 64x128 --crop 64x64 --steps 1 \\
        --device cpu --out /tmp/dry                                          # dry run (the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
STAGES = ("adapt/a", "adapt/c", "distill", "refine", "supervised")


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def synthetic_coco(folder: Path, name: str, n: int, size: tuple[int, int], seed: int) -> Path:
    """``n`` images of ``size`` with 4-12 random rectangles of the 8 classes, as a COCO json."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    images, anns = [], []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(4, 13))):
            bh, bw = int(rng.integers(h // 16, h // 4)), int(rng.integers(w // 16, w // 4))
            y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            cat = int(rng.integers(0, len(CLASSES)))
            img[y:y + bh, x:x + bw] = 80 + 20 * cat
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat + 1, "iscrowd": 0,
                         "bbox": [x, y, bw, bh], "area": bw * bh,
                         "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        file = f"{name}_{i}.png"
        Image.fromarray(img).save(folder / "images" / file)
        images.append({"id": i + 1, "file_name": file, "height": h, "width": w})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)],
            "images_root": str(folder / "images")}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


class Meter:
    """Per stage: wall time, peak GPU memory, time spent waiting for batches."""

    def __init__(self, cuda: bool):
        self.cuda, self.rows, self.loader_s, self.current = cuda, {}, 0.0, None

    def stage(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.loader_s, t0 = 0.0, time.perf_counter()
        out = fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.rows[name] = {"wall_s": round(time.perf_counter() - t0, 2), "loader_wait_s": round(self.loader_s, 3),
                           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None}
        return out


def instrument(meter: Meter) -> None:
    """Time every training stage, the pseudo-label passes and every wait for a batch."""
    from castseg import stages
    from castseg.engine.data import BatchStream

    train_stage, pseudo_label, next_batch = stages.train_stage, stages.pseudo_label, BatchStream.__next__

    def timed_next(self: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return next_batch(self)
        finally:
            meter.loader_s += time.perf_counter() - t0

    stages.train_stage = lambda name, *a, **k: meter.stage(name, train_stage, name, *a, **k)
    stages.pseudo_label = lambda path, cfg, out, *a, **k: meter.stage(f"pseudo-label {out.stem}", pseudo_label,
                                                                      path, cfg, out, *a, **k)
    BatchStream.__next__ = timed_next


def step_seconds(run_dir: Path, stage: str) -> float | None:
    """Median seconds per step from the stage's log.csv, the first (warm-up) step left out."""
    import csv

    log = run_dir / stage / "log.csv"
    if not log.is_file():
        return None
    rows = list(csv.DictReader(log.open()))
    secs = [float(r["sec_per_step"]) for r in rows[1:] or rows if r.get("sec_per_step")]
    return statistics.median(secs) if secs else None


def table(res: dict[str, Any]) -> str:
    head = "| stage | wall s | s/step | images/s | loader share | peak GiB | plan GiB |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]

    def f(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for name, r in res["stages"].items():
        lines.append(f"| {name} | {f(r.get('wall_s'), '.1f')} | {f(r.get('sec_per_step'), '.3f')} | {f(r.get('images_per_s'), '.2f')} | "
                     f"{f(r.get('loader_share'), '.1%')} | {f(r.get('peak_gib'), '.2f')} | {f(r.get('plan_gib'), '.2f')} |")
    for label, e in res["latency"].items():
        lines.append(f"\n{label}: {f(e.get('latency_ms'), '.1f')} ms per {res['image']} image, "
                     f"{f(e.get('params', 0) / 1e6, '.1f')}M params, {f(e.get('gflops'), '.0f')} GFLOPs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", choices=("paper", "tiny"), default="paper", help="hub models' size (tiny: dry run)")
    p.add_argument("--image", type=parse_size, default=(1024, 2048), help="synthetic image size HxW")
    p.add_argument("--crop", type=parse_size, default=None, help="training crop (default: the config's)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per stage")
    p.add_argument("--images", type=int, default=4, help="labeled = unlabeled images; val gets 1")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", nargs="*", default=[], help="more key=value overrides")
    p.add_argument("--hub-cache", type=Path, default=None,
                   help="an HF_HOME that already holds the models (castseg.models.hub_cache); default: write one")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from castseg.models.hub_cache import hub_env, write_hub_cache

    cache = args.hub_cache or out / "hf"
    os.environ.update(hub_env(cache))  # before transformers reads HF_HOME
    t0 = time.perf_counter()
    if args.hub_cache is None:
        write_hub_cache(cache, size=args.size, class_words=CLASSES)
    hub_s = time.perf_counter() - t0
    import torch
    from transformers.utils import logging as hf_logging

    from castseg import stages
    from castseg.config import load_config
    from castseg.plan import plan_run

    hf_logging.disable_progress_bar()
    data = {n: synthetic_coco(out / "data", n, k, args.image, s)
            for n, k, s in (("labeled", args.images, 0), ("unlabeled", args.images, 1), ("val", 1, 2))}
    n = args.steps
    sets = [f"data.labeled={data['labeled']}", f"data.unlabeled={data['unlabeled']}", f"data.val={data['val']}",
            f"train.device={args.device}", "train.ckpt_every=0", "train.val_every=0", "train.log_every=1",
            "train.warmup_steps=0", *(f"{s}.train.max_steps={n}" for s in ("adapt", "distill", "refine", "supervised"))]
    if args.crop:
        sets.append(f"data.crop_size=[{args.crop[0]},{args.crop[1]}]")
    cfg = load_config(ROOT / "configs" / "cityscapes_10pct.yaml", sets + args.set)
    plan = plan_run(cfg, measure_data=False)
    device = stages.run_dist(cfg).device
    meter = Meter(device.type == "cuda")
    instrument(meter)
    run_dir = out / "run"
    metrics = stages.run_all(cfg, run_dir, resume=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "size": args.size, "image": "x".join(map(str, args.image)),
                           "crop": list(cfg.data.crop_size or []), "steps": n, "hub_cache_s": round(hub_s, 1),
                           "stages": {}, "latency": metrics.get("efficiency") or {}}
    for name, row in meter.rows.items():
        est = (plan["stages"].get(name) or {}).get("memory", {}).get("total") if name in STAGES else None
        sec = step_seconds(run_dir, name) if name in STAGES else None
        batch = cfg.stage_train(name.split("/")[0]).batch_size if name in STAGES else None
        train_s = row["wall_s"]
        res["stages"][name] = {**row, "sec_per_step": sec, "plan_gib": est / 2**30 if est else None,
                               "images_per_s": batch * world / sec if sec else None,
                               "loader_share": row["loader_wait_s"] / train_s if name in STAGES and train_s else None}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = f"{res['device']}, torch {res['torch']}, {args.size} models, {res['image']} images, crop {res['crop']}, " \
           f"{n} steps per stage\n\n" + table(res)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
