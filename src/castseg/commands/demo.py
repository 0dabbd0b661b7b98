"""``castseg demo``: CAST end to end on the embedded default dataset, on a CPU, in minutes.

The embedded default is the target domain: 107 colour (H&E histology) DSB2018 images. The demo
splits it (fixed val, 10% of the rest labeled, the others unlabeled), then runs the full
three-stage ``castseg run`` (adapt the teacher → distil into the student → refine on the
labels, plus the supervised-only student) starting from the *pretrained stand-ins* shipped in
``assets/standins`` — a teacher and a student encoder trained on the grey DSB2018 images (the
source domain; recipe in ``tools/train_standins.py``). It prints one table (zero-shot teacher,
adapted teacher, supervised-only, distilled and refined student: AP, AP50, params, latency),
the pseudo-labels' AP on the unlabeled images (against their own annotations, which the split
keeps aside and no stage trains on), the premise ratio (adapted teacher / supervised-only
student) and the report's path. ``--pretrained`` runs the same protocol with the paper's hub
models.

Re-running into the same folder (``runs/demo``; ``--quick``: ``runs/demo-quick``) reuses every
stage whose settings match and redoes the others, one line per stage saying which (an earlier
stage folder with other settings is kept as ``<stage>.stale-<n>``).

This module is the argparse wrapper; the demo itself is :func:`castseg.demo.run_demo`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

# embedded_default: also imported from here by commands recorded in BENCHMARKS.md
from castseg.demo import embedded_default, run_demo  # noqa: F401
from castseg.model_rows import MODEL_ROWS

logger = logging.getLogger(__name__)

OUT_DEFAULT, OUT_QUICK = "runs/demo", "runs/demo-quick"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run CAST end to end on the embedded default dataset",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of assets/demo.yaml, e.g. distill.train.max_steps=400")
    p.add_argument("--out", default=None,
                   help=f"output folder (default {OUT_DEFAULT}; with --quick {OUT_QUICK}); re-running reuses the "
                   "stages whose settings match and redoes the others")
    p.add_argument("--data", default=None, help="COCO json to use instead of the embedded default")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--labeled-fraction", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (≤ 3 min): a few steps per stage, 6 unlabeled and 4 val images")
    p.add_argument("--pretrained", action="store_true",
                   help="the paper's models from the hub (Grounding DINO + SAM2 teacher, DINOv2-S student) "
                   "instead of the stand-ins; needs the network (or a filled HF cache) and, in practice, a GPU")
    p.set_defaults(func=run)
    return p


def output_dir(args: argparse.Namespace) -> Path:
    """``--out``, else the default of this kind of run: a quick run has its own folder, so its
    tiny stages never meet the full demo's."""
    return Path(args.out or (OUT_QUICK if args.quick else OUT_DEFAULT))


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the demo's own output
    result = run_demo(out=output_dir(args), pretrained=args.pretrained, overrides=args.overrides, data=args.data,
                      seed=args.seed, labeled_fraction=args.labeled_fraction, val_fraction=args.val_fraction,
                      quick=args.quick)
    cfg, metrics, ckpt = result["config"], result["metrics"], result["checkpoint"]
    print(f"\nmask AP on {result['val_images']} val images (up to {cfg.eval.max_dets} detections per image), "
          f"latency = one prediction (forward + post-processing) on one val image, {cfg.train.device}:\n")
    print(result["table"])
    logger.info(f"report:  {result['report']}")
    onnx = ((metrics.get("recommendation") or {}).get("files") or {}).get("onnx")
    logger.info(f"student: {ckpt}" + (f" (and {onnx})" if onnx else "")
                + f"\n  use it: castseg predict --checkpoint {ckpt} --images YOUR_IMAGES --out preds"
                + f"\n  or from Python: castseg.load({str(ckpt)!r}).predict('YOUR_IMAGES/')")
    logger.info(f"done in {metrics['seconds']:.0f} s")
    print(json.dumps({k: round(metrics[k]["AP"], 4) for k, _, _ in MODEL_ROWS
                      if (metrics.get(k) or {}).get("AP") is not None}))
    return 0
