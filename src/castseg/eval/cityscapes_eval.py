"""Cityscapes instance-level AP with the official ``cityscapesscripts`` code, in-process.

COCO-style predictions (RLE masks, ``category_id`` = Cityscapes label id, as ``castseg convert
cityscapes`` assigns: person 24, rider 25, car 26, truck 27, bus 28, train 31, motorcycle 32,
bicycle 33) are written in the layout the official script reads — per image a text file of
``relative/mask.png labelId confidence`` lines plus one binary PNG per instance — in a temporary
folder, then matched against ``<gtFine>/<split>/<city>/<stem>_gtFine_instanceIds.png`` by the
script's own matching and AP code. Nothing is written outside that temporary folder: we call the
script's steps ourselves rather than ``evaluateImgLists``, which drops ``matches.json`` into the
working directory, and point its ground-truth cache (``gtInstancesFile``) into the temp folder.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import types
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from castseg.data import masks as M
from castseg.data.coco_io import CocoData, read_json
from castseg.errors import InputError
from castseg.eval.coco_eval import load_gt
from castseg.eval.results import validate_results


def _script() -> types.ModuleType:
    """The official evaluation module, made to run on current NumPy.

    It calls ``np.in1d``, which NumPy 2.4 removed. Rather than patch NumPy for everyone, the
    module's own ``np`` name is pointed at a view of NumPy that adds ``in1d`` back (as
    ``isin`` on the flattened input, which is what ``in1d`` computed).
    """
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cs

    if not hasattr(cs.np, "in1d"):
        compat = types.ModuleType("numpy_with_in1d")
        compat.__dict__.update(np.__dict__)
        compat.in1d = lambda a, b, *args, **kw: np.isin(np.ravel(a), b, *args, **kw)  # type: ignore[attr-defined]
        cs.np = compat
    return cs


def gt_instance_file(gt_folder: str | Path, file_name: str) -> Path | None:
    """``<gt_folder>/<split>/<city>/<stem>_gtFine_instanceIds.png`` for a ``leftImg8bit`` file
    name such as ``leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png``; None if
    absent. Names without split/city folders fall back to a search over splits."""
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    stem = PurePosixPath(parts[-1]).stem
    stem = stem[: -len("_leftImg8bit")] if stem.endswith("_leftImg8bit") else stem
    city = parts[-2] if len(parts) >= 2 else stem.split("_")[0]
    name = f"{stem}_gtFine_instanceIds.png"
    if len(parts) >= 3:
        path = Path(gt_folder) / parts[-3] / city / name
        return path if path.is_file() else None
    found = sorted(Path(gt_folder).glob(f"*/{city}/{name}"))
    return found[0] if len(found) == 1 else None


def _write_predictions(root: Path, index: int, records: list[dict[str, Any]]) -> Path:
    """Write one image's predictions as ``<root>/<index>.txt`` + ``<root>/masks/<index>_<k>.png``."""
    lines = []
    for k, rec in enumerate(records):
        rel = f"masks/{index}_{k}.png"
        # 0/255 and the fastest zlib level: the script only tests "nonzero", and at ~100 masks
        # per 1024x2048 image PNG encoding is the bulk of this function's time.
        Image.fromarray(M.decode(rec["segmentation"]) * np.uint8(255)).save(root / rel, compress_level=1)
        lines.append(f"{rel} {int(rec['category_id'])} {float(rec['score'])!r}\n")
    txt = root / f"{index}.txt"
    txt.write_text("".join(lines))
    return txt


def _check_categories(gt: CocoData) -> None:
    from cityscapesscripts.helpers.labels import id2label

    for cat in gt.categories:
        label = id2label.get(cat["id"])
        if label is None or not label.hasInstances:
            raise InputError(gt.path, f"category id {cat['id']} ({cat.get('name')!r}) is not a Cityscapes instance "
                             "label id; --protocol cityscapes needs the label ids `castseg convert cityscapes` "
                             "writes (person 24 ... bicycle 33)")


def _finite_or_minus_one(v: float) -> float:
    # COCO's convention for "undefined" (no GT of that class), and valid JSON unlike NaN.
    return float(v) if math.isfinite(v) else -1.0


def _gt_files(gt_folder: Path, data: CocoData) -> list[str]:
    """Each image's ``*_gtFine_instanceIds.png`` (absolute), checked to be the image's size."""
    gt_files = []
    for img in data.images:
        if not isinstance(img.get("file_name"), str):
            raise InputError(data.path, f"image id={img['id']}: missing 'file_name'")
        f = gt_instance_file(gt_folder, img["file_name"])
        if f is None:
            raise InputError(data.path, f"image id={img['id']}: no gtFine instanceIds file for "
                             f"{img['file_name']!r} under {gt_folder}")
        with Image.open(f) as im:  # header only: a size mismatch would break the pixel matching
            if (im.height, im.width) != (img["height"], img["width"]):
                raise InputError(f, f"is {im.height}x{im.width}, but {data.path} says image id={img['id']} "
                                 f"is {img['height']}x{img['width']}")
        gt_files.append(str(f.resolve()))
    return gt_files


def evaluate_cityscapes(gt_folder: str | Path, gt: str | Path | dict | CocoData,
                        pred: str | Path | list) -> dict[str, Any]:
    """Official Cityscapes instance AP of ``pred`` on the images of ``gt``.

    Args:
        gt_folder: the ``gtFine`` folder (``<split>/<city>/*_gtFine_instanceIds.png``).
        gt: COCO json (path/dict) from ``castseg convert cityscapes``; its images (ids, sizes,
            ``leftImg8bit/...`` file names) define what is evaluated. Annotations are not read.
        pred: COCO results (path or list) with RLE ``segmentation`` of the image size ``[H, W]``.

    Returns:
        ``{"AP": float, "AP50": float, "per_class": {name: {"AP": float, "AP50": float}}}``
        over the 8 evaluated classes; ``-1.0`` for a class without GT instances (and overall
        when no class has any). An empty prediction list gives 0.
    """
    gt_folder = Path(gt_folder)
    if not gt_folder.is_dir():
        raise InputError(gt_folder, "gtFine folder not found")
    data = load_gt(gt, iou_type=None, require_annotations=False)
    _check_categories(data)
    src = pred if isinstance(pred, (str, Path)) else "<predictions>"
    records = validate_results(read_json(pred) if isinstance(pred, (str, Path)) else pred, data, "segm", src)

    gt_files = _gt_files(gt_folder, data)
    if not gt_files:
        raise InputError(data.path, "has no images to evaluate")
    by_image: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in data.images}
    for rec in records:
        by_image[rec["image_id"]].append(rec)

    cs = _script()
    with tempfile.TemporaryDirectory(prefix="castseg-cityscapes-") as tmp:
        root = Path(tmp).resolve()
        (root / "pred" / "masks").mkdir(parents=True)
        pred_files = [str(_write_predictions(root / "pred", i, by_image[img["id"]]))
                      for i, img in enumerate(data.images)]
        # Our own args object: the script keeps defaults in a module global we must not mutate.
        args = types.SimpleNamespace(**vars(cs.args))
        args.predictionPath = str(root / "pred")  # the script refuses masks outside this folder
        args.gtInstancesFile = str(root / "gtInstances.json")
        args.quiet, args.JSONOutput, args.colorized = True, False, False
        log = io.StringIO()
        try:
            # The script reports errors by printing and calling sys.exit; keep stdout ours.
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # nanmean over classes without GT
                cs.setInstanceLabels(args)
                gt_instances = cs.getGtInstances(gt_files, args)
                matches = cs.matchGtWithPreds(pred_files, gt_files, gt_instances, args)
                aps = cs.evaluateMatches(matches, args)
                averages = cs.computeAverages(aps, args)
        except SystemExit:
            msg = " ".join(log.getvalue().split()) or "cityscapesscripts stopped without a message"
            raise InputError(src, f"Cityscapes evaluation failed: {msg}") from None

    per_class = {name: {"AP": _finite_or_minus_one(v["ap"]), "AP50": _finite_or_minus_one(v["ap50%"])}
                 for name, v in averages["classes"].items()}
    return {"AP": _finite_or_minus_one(averages["allAp"]), "AP50": _finite_or_minus_one(averages["allAp50%"]),
            "per_class": per_class}


def format_cityscapes(stats: dict[str, Any]) -> str:
    """Per-class and average AP / AP50 as a table (the official script's layout)."""
    lines = [f"{'what':<15}{'AP':>10}{'AP_50%':>10}", "-" * 35]
    for name, v in stats["per_class"].items():
        lines.append(f"{name:<15}{v['AP']:>10.3f}{v['AP50']:>10.3f}")
    lines += ["-" * 35, f"{'average':<15}{stats['AP']:>10.3f}{stats['AP50']:>10.3f}"]
    return "\n".join(lines)
