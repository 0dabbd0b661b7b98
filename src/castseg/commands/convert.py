"""``castseg convert FORMAT SRC --out ANN.json``: a dataset in a common layout → COCO instances json.

A thin wrapper over :func:`castseg.api.data.convert`, which does the work (and the checks:
inputs are never modified; ``--out`` may live inside the dataset folder, but an existing file
there is only replaced if an earlier ``castseg convert`` wrote it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

FORMAT_HELP = {
    "coco": "validate + normalise a COCO instances json (SRC = the json)",
    "yolo-seg": "Ultralytics layout: images/, labels/*.txt polygons, names yaml",
    "mask-folders": "DSB2018 layout: <id>/images/<id>.png + <id>/masks/*.png (one per instance)",
    "cityscapes": "Cityscapes root with gtFine/ and leftImg8bit/ (8 thing classes)",
    "ade20k": "ADE20K instance benchmark (ADEChallengeData2016 with annotations_instance/)",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from castseg.data.convert import FORMATS

    formats = "\n".join(f"  {name:<13} {FORMAT_HELP.get(name, '')}" for name in FORMATS)
    p = subparsers.add_parser(
        "convert",
        help="convert a dataset (coco, yolo-seg, mask-folders, cityscapes, ade20k) to COCO instances json",
        description="Convert a dataset to a COCO instances json (compressed-RLE masks, recomputed "
                    "area/bbox, stable ids). Formats:\n" + formats,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help="one of: " + ", ".join(FORMATS))
    p.add_argument("src", type=Path, metavar="SRC", help="dataset folder (for coco: the json file)")
    p.add_argument("--out", "-o", type=Path, required=True, metavar="ANN.json", help="output COCO json")
    p.add_argument("--images-root", type=Path, metavar="DIR",
                   help="coco: folder that file_names are relative to (default: the json's folder)")
    p.add_argument("--names", type=Path, metavar="YAML",
                   help="yolo-seg: yaml with 'names' (default: SRC/data.yaml or the single *.yaml in SRC)")
    p.add_argument("--class-name", metavar="NAME", help="mask-folders: the class name (default: nucleus)")
    p.add_argument("--split", metavar="SPLIT",
                   help="cityscapes: train|val|test (default train); ade20k: training|validation "
                        "(default training); yolo-seg: a subfolder of images/ (default: all)")
    p.add_argument("--no-verify-images", action="store_true",
                   help="read image sizes from headers only instead of decoding every image (faster; "
                        "corrupt images are then found later)")
    p.add_argument("--workers", type=int, metavar="N", help="threads for per-image work (default: up to 4)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from castseg.api.data import convert

    convert(args.format, args.src, out=args.out, images_root=args.images_root, names=args.names,
            class_name=args.class_name, split=args.split, verify_images=not args.no_verify_images,
            workers=args.workers)
    return 0
