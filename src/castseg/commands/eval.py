"""``castseg eval``: COCO AP (faster-coco-eval) or the official Cityscapes instance AP.

A thin wrapper over :func:`castseg.api.data.evaluate` (see :mod:`castseg.eval.coco_eval` and
:mod:`castseg.eval.cityscapes_eval`). With ``--json`` stdout carries exactly one JSON object, so
scripts can parse it; otherwise a readable table.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="score predictions (COCO results json) against ground truth",
        description="Compute COCO mask or box AP/AR of a COCO results json (a list of "
        "{image_id, category_id, score, segmentation|bbox}) against a COCO instances json, over "
        "all GT images with COCO's default parameters; or, with --protocol cityscapes, the "
        "official Cityscapes instance-level AP against a gtFine folder.",
    )
    p.add_argument("--gt", required=True, help="ground-truth COCO instances json")
    p.add_argument("--pred", required=True, help="predictions: COCO results json (a list of records)")
    p.add_argument("--protocol", choices=["coco", "cityscapes"], default="coco",
                   help="coco (default): COCO AP/AR; cityscapes: official Cityscapes instance AP "
                   "(needs --gt-folder; category ids must be Cityscapes label ids)")
    p.add_argument("--iou-type", choices=["segm", "bbox"], default=None,
                   help="segm (mask IoU, default) or bbox (box IoU); coco protocol only")
    p.add_argument("--gt-folder", default=None, metavar="GTFINE_DIR",
                   help="Cityscapes gtFine folder (<split>/<city>/*_gtFine_instanceIds.png); "
                   "--protocol cityscapes only")
    p.add_argument("--images-root", default=None,
                   help="folder the GT's file names are relative to; accepted for symmetry with "
                   "other verbs: evaluation reads no images")
    p.add_argument("--max-dets", type=int, default=100, metavar="N",
                   help="detections per image that count (COCO default 100; use more for dense "
                   "scenes such as nuclei, where AR100 then means AR@N)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from castseg.api.data import evaluate

    iou_type = args.iou_type or "segm"
    stats = evaluate(args.pred, args.gt, protocol=args.protocol, iou_type=iou_type, max_dets=args.max_dets,
                     gt_folder=args.gt_folder, images_root=args.images_root)
    if args.json:
        print(json.dumps(stats))
    elif args.protocol == "cityscapes":
        from castseg.eval.cityscapes_eval import format_cityscapes

        print(f"Cityscapes instance AP of {args.pred} on {args.gt} (gtFine: {args.gt_folder})")
        print(format_cityscapes(stats))
    else:
        from castseg.eval.coco_eval import format_stats

        print(f"COCO {iou_type} evaluation of {args.pred} on {args.gt}")
        print(format_stats(stats, args.max_dets))
    return 0
