"""castseg's `small` student vs transformers' Mask2Former with a DINOv2-S backbone, on CPU.

    python benchmarks/bench_mask2former.py [--size 512] [--batch 2] [--repeats 3] [--threads N]

Times, for each model, one training step (forward + set loss + backward + AdamW step) and one
inference forward (eval mode, no grad) on the same random input and the same random targets,
and prints the medians, the ratio castseg / transformers and the parameter counts as a
markdown table. Both models run in this process with the same thread count; their timings are
interleaved (castseg, transformers, castseg, ...) so that load from other processes on a shared
machine hits both alike: the ratio is the number to compare, not the absolute times.

The two models (random weights; nothing is downloaded):

* castseg ``small``: DINOv2-S (layers 2/5/8/11) -> DPT neck (strides 4/8/16/32) -> 9-layer
  masked-attention decoder, 100 queries; loss = castseg's ``SetLoss`` (12544 points).
* transformers ``Mask2FormerForUniversalSegmentation``: ``Dinov2Backbone`` (DINOv2-S dims,
  stages 3/6/9/12 = the outputs of layers 2/5/8/11) -> Mask2Former's multi-scale deformable
  pixel decoder (6 layers) -> masked-attention decoder (``decoder_layers=10``, i.e. 9 layers),
  100 queries, hidden 256; loss = transformers' own (``mask_labels`` / ``class_labels``,
  12544 points). A plain ViT gives every map at stride 14, so this model's pixel decoder and
  masks run at stride 14 (36x36 for 512 px), where castseg's DPT neck resamples to strides
  4..32 and predicts masks at stride 4 (128x128 for 512 px); the table reports both.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

from castseg.losses.set_loss import SetLoss
from castseg.models.student import StudentConfig, build_student, count_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_targets(batch: int, size: int, num_classes: int, instances: int, gen: torch.Generator
                   ) -> list[dict[str, torch.Tensor]]:
    """``instances`` random rectangles per image (full resolution), random classes."""
    targets = []
    for _ in range(batch):
        masks = torch.zeros(instances, size, size)
        for k in range(instances):
            y0, x0 = (int(v) for v in torch.randint(0, size * 3 // 4, (2,), generator=gen))
            h, w = (int(v) for v in torch.randint(size // 32 + 1, size // 4, (2,), generator=gen))
            masks[k, y0:y0 + h, x0:x0 + w] = 1.0
        targets.append({"labels": torch.randint(0, num_classes, (instances,), generator=gen), "masks": masks})
    return targets


def build_transformers_mask2former(num_classes: int) -> torch.nn.Module:
    from transformers import (
        Dinov2Config,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "Backbone dinov2 is not a supported model" (only Swin is listed): it runs

    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                            patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                            use_swiglu_ffn=False, drop_path_rate=0.0,
                            out_features=["stage3", "stage6", "stage9", "stage12"],
                            apply_layernorm=True, reshape_hidden_states=True)
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=num_classes, num_queries=100, hidden_dim=256,
                            feature_size=256, mask_feature_size=256, decoder_layers=10, encoder_layers=6,
                            num_attention_heads=8, dim_feedforward=2048, feature_strides=[14, 14, 14, 14],
                            train_num_points=12544, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0,
                            dice_weight=5.0, use_auxiliary_loss=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Mask2FormerForUniversalSegmentation(cfg)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="square input side in pixels")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--classes", type=int, default=1, help="foreground classes")
    ap.add_argument("--instances", type=int, default=5, help="target instances per image")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = build_student(StudentConfig.from_preset("small", pretrained=False, num_classes=args.classes))
    theirs = build_transformers_mask2former(args.classes)
    fns = measured_steps(args, ours, theirs)
    mask_res = {"castseg": tuple(fns["infer_ours"]().shape[-2:]),
                "transformers": tuple(fns["infer_theirs"]().shape[-2:])}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for name, fn in fns.items():  # warm-up: allocator, lazy init, optimizer state
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    print_table(args, ours, theirs, mask_res, {k: statistics.median(v) for k, v in times.items()})


def measured_steps(args: argparse.Namespace, ours, theirs) -> dict:
    """The four timed closures: a training step (forward, loss, backward, AdamW) and an eval
    forward of each model, on the same ``[B,3,S,S]`` input and targets."""
    criterion = SetLoss(args.classes)  # defaults = Mask2Former's: 12544 points, weights 2/5/5, no-object 0.1
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)  # castseg: [0,1], normalised inside
    x_norm = (x - ours.pixel_mean) / ours.pixel_std  # transformers: expects normalised pixel_values
    targets = random_targets(args.batch, args.size, args.classes, args.instances, gen)
    mask_labels = [t["masks"] for t in targets]
    class_labels = [t["labels"] for t in targets]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.05)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.05)

    def train_ours() -> None:
        ours.train()
        opt_ours.zero_grad(set_to_none=True)
        criterion(ours(x), targets)["loss"].backward()
        opt_ours.step()

    def train_theirs() -> None:
        theirs.train()
        opt_theirs.zero_grad(set_to_none=True)
        theirs(pixel_values=x_norm, mask_labels=mask_labels, class_labels=class_labels).loss.backward()
        opt_theirs.step()

    @torch.no_grad()
    def infer_ours() -> torch.Tensor:
        ours.eval()
        return ours(x)["pred_masks"]

    @torch.no_grad()
    def infer_theirs() -> torch.Tensor:
        theirs.eval()
        return theirs(pixel_values=x_norm).masks_queries_logits

    return {"train_ours": train_ours, "train_theirs": train_theirs, "infer_ours": infer_ours,
            "infer_theirs": infer_theirs}


def print_table(args: argparse.Namespace, ours, theirs, mask_res: dict, med: dict) -> None:
    import transformers

    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    n_ours_enc, n_theirs_enc = count_parameters(ours.encoder), count_parameters(theirs.model.pixel_level_module.encoder)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: {cmd}")
    print(f"input {args.batch}x3x{args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"{args.classes} class(es), {args.instances} target instances/image, median of {args.repeats} "
          f"(interleaved, after 1 warm-up); torch {torch.__version__}, transformers {transformers.__version__}")
    print()
    print("| | castseg `small` | transformers Mask2Former (DINOv2-S) | ratio castseg/transformers |")
    print("|---|---|---|---|")
    print(f"| parameters (M) | {n_ours / 1e6:.1f} | {n_theirs / 1e6:.1f} | {n_ours / n_theirs:.2f} |")
    print(f"| encoder parameters (M) | {n_ours_enc / 1e6:.1f} | {n_theirs_enc / 1e6:.1f} | "
          f"{n_ours_enc / n_theirs_enc:.2f} |")
    print(f"| mask logits resolution | {mask_res['castseg'][0]}x{mask_res['castseg'][1]} | "
          f"{mask_res['transformers'][0]}x{mask_res['transformers'][1]} | |")
    print(f"| train step (fwd + loss + bwd + AdamW), median s | {med['train_ours']:.2f} | "
          f"{med['train_theirs']:.2f} | {med['train_ours'] / med['train_theirs']:.2f} |")
    print(f"| inference forward (eval, no grad), median s | {med['infer_ours']:.2f} | "
          f"{med['infer_theirs']:.2f} | {med['infer_ours'] / med['infer_theirs']:.2f} |")


if __name__ == "__main__":
    main()
