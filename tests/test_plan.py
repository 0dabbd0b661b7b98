"""`castseg plan`'s memory estimate against a real CPU training step.

"Peak" on the measured side: the most bytes of CPU tensors alive at once during the second
training step (the first one creates AdamW's state): the bytes alive when the step starts
(weights, buffers, AdamW state, the batch) plus the peak of the running sum of allocations and
frees that ``torch.profiler`` (``profile_memory=True``) records during the step. It is exact
bookkeeping of the allocator calls (no RSS noise), independent of the meta-device replay the
estimate comes from.
"""

from __future__ import annotations

import pytest
import torch

from castseg.config import RunConfig
from castseg.plan import plan_run

INSTANCES = 8


def tiny_config(batch: int, crop: int) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"preset": "tiny", "num_queries": 20, "dec_layers": 2},
        "data": {"crop_size": [crop, crop]},
        "train": {"batch_size": batch, "device": "cpu"},
        "loss": {"num_points": 1024, "max_anchors": 64, "num_negatives": 16},
    })


def _batch(n: int, h: int, w: int) -> dict:
    """``n`` random images with INSTANCES rectangular instances each, as collate_instances makes them."""
    images = torch.rand(n, 3, h, w)
    targets = []
    for _ in range(n):
        masks = torch.zeros(INSTANCES, h, w, dtype=torch.bool)
        for k in range(INSTANCES):
            masks[k, 10 * k:10 * k + 40, 12 * k:12 * k + 50] = True
        targets.append({"masks": masks, "labels": torch.zeros(INSTANCES, dtype=torch.long)})
    return {"images": images, "images_strong": images.clone(), "valid": torch.ones(n, h, w, dtype=torch.bool),
            "targets": targets}


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


def measured_distill_peak(cfg: RunConfig) -> int:
    """Peak CPU tensor bytes of one distill step (the real objective, AdamW) of ``cfg``."""
    from torch.profiler import ProfilerActivity, profile

    from castseg.models import build_student
    from castseg.objective import build_objective

    torch.manual_seed(0)
    model = build_student(cfg.model).train()
    objective = build_objective(1, cfg.loss, cfg.loss.lambda_semi, cfg.loss.lambda_pxl)
    h, w = cfg.data.crop_size
    labeled, unlabeled = _batch(cfg.train.batch_size, h, w), _batch(cfg.train.batch_size, h, w)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        objective(model, labeled, unlabeled, step=0)["loss"].backward()
        opt.step()

    step()
    batch_tensors = [b[k] for b in (labeled, unlabeled) for k in ("images", "images_strong", "valid")] + \
        [t[k] for b in (labeled, unlabeled) for t in b["targets"] for k in ("masks", "labels")]
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    before = _nbytes([*model.parameters(), *model.buffers(), *state, *batch_tensors])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return before + peak


@pytest.mark.parametrize("batch,crop", [(1, 256), (2, 320)])
def test_estimate_is_within_25_percent_of_a_measured_cpu_step(batch, crop):
    cfg = tiny_config(batch, crop)
    estimate = plan_run(cfg, measure_data=False, instances=INSTANCES)["stages"]["distill"]["memory"]
    measured = measured_distill_peak(cfg)
    assert measured > 40 * 2 ** 20  # activations dominate: tens of MB against ~6 MB of weights
    print(f"batch {batch}+{batch} at {crop}x{crop}: estimated {estimate['total'] / 2**20:.1f} MiB "
          f"(activations {estimate['activations'] / 2**20:.1f}), measured {measured / 2**20:.1f} MiB")
    assert abs(estimate["total"] - measured) / measured < 0.25


def test_plan_rows_scale_with_the_batch_and_amp():
    one = plan_run(tiny_config(1, 128), measure_data=False, instances=INSTANCES)["stages"]
    two = plan_run(tiny_config(2, 128), measure_data=False, instances=INSTANCES)["stages"]
    assert two["refine"]["gflops_per_step"] == pytest.approx(2 * one["refine"]["gflops_per_step"], rel=0.05)
    assert two["distill"]["batch"] == 4 and two["refine"]["batch"] == 2
    assert one["adapt/a"] == {"skipped": "no teacher section"}
    cfg = tiny_config(1, 128).model_copy(update={"train": tiny_config(1, 128).train.model_copy(update={"amp": "bf16"})})
    half = plan_run(cfg, measure_data=False, instances=INSTANCES)["stages"]["refine"]["memory"]["activations"]
    assert half == pytest.approx(one["refine"]["memory"]["activations"] / 2, rel=0.01)
