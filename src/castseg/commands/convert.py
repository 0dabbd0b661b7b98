"""``castseg convert FORMAT SRC --out ANN.json``: a dataset in a common layout → COCO instances json.

Inputs are never modified. ``--out`` may live inside the dataset folder, but an existing file
there is only replaced if an earlier ``castseg convert`` wrote it: anything else could be one
of the inputs (or something else the user cares about).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from castseg.errors import InputError

logger = logging.getLogger(__name__)

FORMAT_HELP = {
    "coco": "validate + normalise a COCO instances json (SRC = the json)",
    "yolo-seg": "Ultralytics layout: images/, labels/*.txt polygons, names yaml",
    "mask-folders": "DSB2018 layout: <id>/images/<id>.png + <id>/masks/*.png (one per instance)",
    "cityscapes": "Cityscapes root with gtFine/ and leftImg8bit/ (8 thing classes)",
    "ade20k": "ADE20K instance benchmark (ADEChallengeData2016 with annotations_instance/)",
}

# CLI flag of each format-specific option (for error messages).
FLAGS = {"images_root": "--images-root", "names": "--names", "class_name": "--class-name", "split": "--split"}


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


def _written_by_convert(path: Path) -> bool:
    from castseg.data.convert._common import MARKER_PREFIX

    try:
        with open(path, "rb") as f:
            return f.read(len(MARKER_PREFIX)) == MARKER_PREFIX.encode("ascii")
    except OSError:
        return False


def check_out(out: Path, src: Path, explicit_inputs: list[Path], dataset_dirs: list[Path]) -> None:
    """Refuse an ``--out`` that is an input, or an existing file in a dataset folder that
    ``castseg convert`` did not write."""
    target = out.resolve()
    if target.is_dir():
        raise InputError(out, "--out is a folder; give the path of the .json file to write")
    for p in [src, *explicit_inputs]:
        if p.exists() and target == p.resolve():
            raise InputError(out, "--out is an input of this conversion; refusing to overwrite it")
    if target.exists() and not _written_by_convert(target):
        for d in dataset_dirs:
            if d.resolve() in target.parents:
                raise InputError(out, f"already exists inside the dataset folder {str(d)!r} and was not "
                                      "written by castseg convert (it may be an input); choose another --out")


def run(args: argparse.Namespace) -> int:
    from castseg.data.coco_io import images_root_entry, write_json
    from castseg.data.convert import OPTIONS, convert

    fmt, src, out = args.format, Path(args.src), Path(args.out)
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    for key in given:
        if key not in OPTIONS[fmt]:
            users = [f for f, keys in OPTIONS.items() if key in keys]
            raise InputError(None, f"{FLAGS[key]} applies to {', '.join(users)}, not to {fmt}")
    if args.workers is not None and args.workers < 1:
        raise InputError(None, "--workers must be at least 1")
    if not src.exists():
        raise InputError(src, "not found")

    explicit = [p for p in (given.get("names"),) if p is not None]
    if src.is_dir():
        dataset_dirs = [src]
    else:
        dataset_dirs = [src.parent] + ([given["images_root"]] if "images_root" in given else [])
    check_out(out, src, explicit, dataset_dirs)

    data = convert(fmt, src, verify_images=not args.no_verify_images, workers=args.workers, **given)

    # File names are relative to the dataset root; record where that is as seen from the
    # output's folder (omitted when it is that folder, the COCO default).
    root = Path(data["images_root"]).resolve()
    out_dir = out.resolve().parent
    if root == out_dir:
        del data["images_root"]
    else:
        data["images_root"] = images_root_entry(root, out_dir)
    write_json(data, out)
    logger.info(f"{fmt} {src} → {len(data['images'])} images, {len(data['annotations'])} annotations, "
                f"{len(data['categories'])} categories → {out}")
    return 0
