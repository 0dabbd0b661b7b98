"""``castseg pseudo-label``: run a frozen teacher over an unlabeled set once and cache the result.

Writes ``OUT`` (COCO results: RLE masks, scores, category ids) and ``OUT.manifest.json``; score
thresholds are applied when the cache is read, so it is made once per teacher. Resumable (rerun
the same command after a kill) and sharded under ``torchrun --nproc_per_node N -m castseg.cli
pseudo-label ...``. With ``--predictions`` instead of ``--teacher`` it writes the same cache
from another model's COCO results (or a COCO json's annotations, score 1). A thin wrapper over
:func:`castseg.api.data.pseudo_label`; see :mod:`castseg.pseudo_labels`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pseudo-label", help="cache a frozen teacher's instances on unlabeled images",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher",
                     help="castseg checkpoint (folder / model.json), teacher folder (teacher.json) or teacher config "
                     "(.yaml/.json with 'type', optionally under 'teacher:')")
    src.add_argument("--predictions",
                     help="instead of a teacher: COCO results json of a model run elsewhere (or a COCO json whose "
                     "annotations become pseudo-labels at score 1), written as the cache")
    p.add_argument("--images", required=True, help="unlabeled images: COCO json (its 'images') or a folder")
    p.add_argument("--images-root", default=None, help="for a COCO json: folder its file names are relative to")
    p.add_argument("--out", required=True, help="pseudo-label cache to write, e.g. pseudo.json")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward (1: padding in mixed-size batches changes ViT outputs)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one, else the CPU), cpu, cuda, "
                   "cuda:1 ... (under torchrun: auto/cuda → cuda:LOCAL_RANK)")
    p.add_argument("--min-score", type=float, default=0.05,
                   help="keep instances scoring at least this (a floor that bounds the file size; the training "
                   "threshold is applied when reading; default 0.05)")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="images per part file: the unit of progress saved and of resuming (default 64)")
    p.add_argument("--max-size", type=int, default=None,
                   help="resize so the longest side is at most this for the teacher (masks are saved at full size)")
    p.add_argument("--workers", type=int, default=0, help="threads decoding images ahead of the teacher")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing cache or unfinished pass made with other settings")
    p.add_argument("--class-names", nargs="+", default=None,
                   help="classes to label (default: the teacher's, else the images json's categories; "
                   "with --predictions and a folder of images: category ids 1..C)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from castseg.api.data import pseudo_label

    pseudo_label(args.teacher, images=args.images, out=args.out, predictions=args.predictions,
                 images_root=args.images_root, class_names=args.class_names, batch_size=args.batch_size,
                 device=args.device, min_score=args.min_score, chunk_size=args.chunk_size, max_size=args.max_size,
                 workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
