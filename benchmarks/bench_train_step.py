"""Training steps/s of the CPU student (``lite_student``) today vs cheaper variants, same run.

    python benchmarks/bench_train_step.py [--steps 6] [--rounds 3] [--threads 2]

One step = the distillation stage's objective J(D_l, D_u; 1, 0.1) (set loss on a labeled and a
pseudo-labelled batch of 4 crops of 224², L_pxl with its stop-gradient strong view) + backward
+ AdamW, on fixed batches of the embedded H&E images. Variants are interleaved round by round
(A B C ... A B C ...) so that drift on a shared machine hits all of them alike; the table's
ratio is to the first row, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from castseg.demo import embedded_default
from castseg.data.dataset import CocoInstanceDataset, collate_instances
from castseg.data.transforms import WeakView
from castseg.models import StudentConfig, build_student, param_groups
from castseg.config import LossConfig
from castseg.objective import build_objective

VARIANTS: dict[str, dict[str, Any]] = {
    "today (no freezing, 2048 points)": {},
    "freeze stem + stride-4 stage": {"freeze_encoder_stages": 1},
    "freeze stem + stride-4/8 stages": {"freeze_encoder_stages": 2},
    "channels_last": {"channels_last": True},
    "1024 points": {"num_points": 1024},
    "freeze stride-4/8 + 1024 points": {"freeze_encoder_stages": 2, "num_points": 1024},
}


def batches(n: int = 4) -> tuple[dict, dict]:
    """A labeled and an "unlabeled" batch (ground truth standing in for pseudo-labels)."""
    torch.manual_seed(0)  # the crops and strong views: the same batches for every variant
    ds = CocoInstanceDataset(embedded_default(), transform=WeakView(crop_size=(224, 224), scale_range=(1, 1)),
                             strong_view=True)
    samples = [ds[i] for i in range(2 * n)]
    return collate_instances(samples[:n], 32), collate_instances(samples[n:], 32)


def make_step(opts: dict[str, Any], labeled: dict, unlabeled: dict):
    torch.manual_seed(0)
    cfg = StudentConfig.from_preset("lite_student", pretrained=False,
                                    freeze_encoder_stages=opts.get("freeze_encoder_stages", 0))
    model = build_student(cfg).train()
    if opts.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    loss = LossConfig(num_points=opts.get("num_points", 2048), max_anchors=512, num_negatives=100)
    objective = build_objective(1, loss, 1.0, 0.1)
    opt = torch.optim.AdamW(param_groups(model, 5e-4, 0.5), lr=5e-4)

    def step() -> float:
        t = time.perf_counter()
        out = objective(model, labeled, unlabeled, step=0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return time.perf_counter() - t

    return step


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labeled, unlabeled = batches()
    steps = {name: make_step(VARIANTS[name], labeled, unlabeled) for name in args.variants}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        step()  # warm-up: allocator, lazy init
    for r in range(args.rounds):
        for name, step in steps.items():
            times[name] += [step() for _ in range(args.steps)]
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    base = statistics.median(times[args.variants[0]])
    print(f"\nlite_student, batch 4+4 crops of 224², {args.threads} threads, median of "
          f"{args.steps * args.rounds} steps per variant\n")
    print("| variant | s / step | steps / s | speed-up vs today |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {1 / med:.2f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
