"""``castseg split``: labeled / unlabeled (/ val) splits of a COCO instances file.

A thin wrapper over :func:`castseg.api.data.split`; see :mod:`castseg.data.split` for how splits
stay reproducible and nested.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "split",
        help="split a COCO file into labeled / unlabeled (/ val) parts",
        description="Split a COCO instances file into labeled.json (images + annotations), "
        "unlabeled.json (images only, no 'annotations' key), unlabeled_gt.json (those images' own "
        "annotations, set aside to score pseudo-labels: `castseg run --unlabeled-gt`; no stage trains on "
        "it) and, with --val-fraction, val.json. "
        "The val set is drawn first and does not depend on the labeled fraction; labeled sets "
        "for growing fractions with one seed are nested. Outputs keep file names and record "
        "the images folder in a top-level 'images_root' key, so they load from anywhere.",
    )
    p.add_argument("ann", help="COCO instances json to split")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--labeled-fraction", type=float, metavar="F",
                       help="fraction in (0, 1] of the non-val images to keep labeled (at least 1 image)")
    which.add_argument("--labeled-ids", metavar="FILE",
                       help="explicit labeled list (e.g. Guided Distillation perc_10.txt): one file "
                       "name, stem or path per line")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="fraction in [0, 1) of all images held out as val.json (default 0: none)")
    p.add_argument("--out-dir", required=True, help="folder for labeled.json, unlabeled.json, val.json, split.json")
    p.add_argument("--images-root", default=None,
                   help="folder the input's file names are relative to (default: the input's "
                   "'images_root' key, else its folder)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from castseg.api.data import split

    split(args.ann, out_dir=args.out_dir, labeled_fraction=args.labeled_fraction, labeled_ids=args.labeled_ids,
          seed=args.seed, val_fraction=args.val_fraction, images_root=args.images_root)
    return 0
