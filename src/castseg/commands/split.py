"""``castseg split``: labeled / unlabeled (/ val) splits of a COCO instances file.

See :mod:`castseg.data.split` for how splits stay reproducible and nested.
"""

from __future__ import annotations

import argparse
import logging

from castseg.data.coco_io import load_coco
from castseg.data.split import make_split, match_labeled_ids, read_id_list, stale_outputs, write_split

logger = logging.getLogger(__name__)


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
    coco = load_coco(args.ann, images_root=args.images_root)
    ids = None
    if args.labeled_ids is not None:
        ids = match_labeled_ids(coco, read_id_list(args.labeled_ids), args.labeled_ids)
    split = make_split(coco, seed=args.seed, labeled_fraction=args.labeled_fraction,
                       val_fraction=args.val_fraction, labeled_ids=ids)
    written = write_split(coco, split, args.out_dir, args.seed, args.labeled_fraction,
                          args.val_fraction, args.labeled_ids)
    n_pool = len(split.labeled) + len(split.unlabeled)
    logger.info(f"split {args.ann}: {len(coco.images)} images -> labeled {len(split.labeled)} "
                f"({100.0 * len(split.labeled) / n_pool:.1f}% of {n_pool}), unlabeled {len(split.unlabeled)}, "
                f"val {len(split.val)}; wrote {', '.join(str(p) for p in written.values())}")
    for path in stale_outputs(args.out_dir, split, coco):
        logger.warning(f"{path} is from an earlier run; this split has no such part (see split.json)")
    return 0
