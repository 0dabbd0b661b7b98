"""Data verbs as functions: :func:`convert`, :func:`split`, :func:`evaluate`, :func:`pseudo_label`.

``castseg convert`` / ``split`` / ``eval`` / ``pseudo-label`` parse their flags and call these; a
script calls them directly. Bad input raises :class:`castseg.errors.CastsegError` (one line naming
the file and the problem; where a problem is about an argument, the message names the argument and
the CLI flag that sets it). Progress and summaries are messages on the ``castseg`` logger (a
library adds no handler: :func:`castseg.console.install` shows them on stderr), never results.

The examples run in a folder holding ``cells/``, a 3-image dataset in the mask-folders (DSB2018)
layout, ``cells/<id>/images/<id>.png`` + ``cells/<id>/masks/*.png`` with 9 instances in all;
``tests/test_api_data.py`` makes it and runs them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castseg.errors import InputError

if TYPE_CHECKING:
    from castseg.data.coco_io import CocoData
    from castseg.models.teacher import Teacher

logger = logging.getLogger(__name__)

__all__ = ["convert", "evaluate", "pseudo_label", "split"]

# CLI flag of each format-specific option of convert (named in error messages).
CONVERT_FLAGS = {"images_root": "--images-root", "names": "--names", "class_name": "--class-name",
                 "split": "--split"}
PROTOCOLS = ("coco", "cityscapes")


# ---------------------------------------------------------------- convert

def _written_by_convert(path: Path) -> bool:
    from castseg.data.convert._common import MARKER_PREFIX

    try:
        with open(path, "rb") as f:
            return f.read(len(MARKER_PREFIX)) == MARKER_PREFIX.encode("ascii")
    except OSError:
        return False


def _check_out(out: Path, src: Path, explicit_inputs: list[Path], dataset_dirs: list[Path]) -> None:
    """Refuse an ``out`` that is a folder or an input, or an existing file in a dataset folder that
    convert did not write (it could be one of the inputs, or something else the user cares about)."""
    target = out.resolve()
    if target.is_dir():
        raise InputError(out, "is a folder; out (--out) must be the path of the .json file to write")
    for p in [src, *explicit_inputs]:
        if p.exists() and target == p.resolve():
            raise InputError(out, "is an input of this conversion; refusing to overwrite it")
    if target.exists() and not _written_by_convert(target):
        for d in dataset_dirs:
            if d.resolve() in target.parents:
                raise InputError(out, f"already exists inside the dataset folder {str(d)!r} and was not "
                                      "written by castseg convert (it may be an input); choose another out (--out)")


def convert(format: str, source: str | Path, *, out: str | Path, images_root: str | Path | None = None,
            names: str | Path | None = None, class_name: str | None = None, split: str | None = None,
            verify_images: bool = True, workers: int | None = None) -> Path:
    """Convert a dataset in a common layout to a COCO instances json (what ``castseg convert`` does).

    Masks are written as compressed RLE with recomputed ``area`` / ``bbox`` and stable ids; file
    names stay relative to the dataset root, and the json records where that root is, seen from
    its own folder, in a top-level ``"images_root"`` key (left out when it is that folder, the
    COCO default), so the file loads from anywhere. Inputs are never modified. ``out`` may lie
    inside the dataset folder, but an existing file there is replaced only if an earlier convert
    wrote it. Logs one summary line (images, annotations, categories).

    Args:
        format: ``"coco"`` (validate + normalise a COCO json; ``source`` is the json),
            ``"yolo-seg"`` (Ultralytics: ``images/``, ``labels/*.txt`` polygons, a names yaml),
            ``"mask-folders"`` (DSB2018: ``<id>/images/<id>.png`` + ``<id>/masks/*.png``, one mask
            per instance), ``"cityscapes"`` (a root with ``gtFine/`` and ``leftImg8bit/``) or
            ``"ade20k"`` (``ADEChallengeData2016`` with ``annotations_instance/``).
        source: the dataset folder (for ``"coco"``: the json file).
        out: the COCO json to write (its folder is created).
        images_root: coco only: folder the file names are relative to (default: the json's folder).
        names: yolo-seg only: yaml with ``names`` (default: ``source/data.yaml`` or the single
            ``*.yaml`` in ``source``).
        class_name: mask-folders only: the class name (default ``"nucleus"``).
        split: cityscapes: ``train`` | ``val`` | ``test`` (default train); ade20k: ``training`` |
            ``validation`` (default training); yolo-seg: a subfolder of ``images/`` (default: all).
        verify_images: decode every image (finds corrupt or truncated files now); ``False`` reads
            sizes from the headers only, which is faster.
        workers: threads for per-image work (default: up to 4).

    Returns:
        The path of the written json (``out``).

    Raises:
        InputError: unknown format, an option the format does not take, ``source`` not found, an
            ``out`` that is a folder, an input or a file convert did not write inside the dataset
            folder, or bad data (one line naming the file).

    Examples:
        >>> ann = convert("mask-folders", "cells", out="cells.json", class_name="nucleus")
        >>> print(ann)
        cells.json
        >>> import json
        >>> data = json.loads(ann.read_text())
        >>> len(data["images"]), len(data["annotations"]), data["categories"][0]["name"]
        (3, 9, 'nucleus')
        >>> data["images"][0]["file_name"]
        'img000/images/img000.png'
    """
    from castseg.data.coco_io import images_root_entry, write_json
    from castseg.data.convert import FORMATS, OPTIONS
    from castseg.data.convert import convert as convert_dataset

    if format not in FORMATS:
        raise InputError(None, f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(source), Path(out)
    options = {"images_root": images_root, "names": names, "class_name": class_name, "split": split}
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in OPTIONS[format]:
            users = [f for f, keys in OPTIONS.items() if key in keys]
            raise InputError(None, f"{key} ({CONVERT_FLAGS[key]}) applies to {', '.join(users)}, not to {format}")
    for key in ("images_root", "names"):
        if key in given:
            given[key] = Path(given[key])
    if workers is not None and workers < 1:
        raise InputError(None, f"workers (--workers) must be at least 1, got {workers}")
    if not src.exists():
        raise InputError(src, "not found")

    explicit = [p for p in (given.get("names"),) if p is not None]
    if src.is_dir():
        dataset_dirs = [src]
    else:
        dataset_dirs = [src.parent] + ([given["images_root"]] if "images_root" in given else [])
    _check_out(out, src, explicit, dataset_dirs)

    data = convert_dataset(format, src, verify_images=verify_images, workers=workers, **given)

    # File names are relative to the dataset root; record where that is as seen from the
    # output's folder (omitted when it is that folder, the COCO default).
    root = Path(data["images_root"]).resolve()
    out_dir = out.resolve().parent
    if root == out_dir:
        del data["images_root"]
    else:
        data["images_root"] = images_root_entry(root, out_dir)
    write_json(data, out)
    logger.info(f"{format} {src} → {len(data['images'])} images, {len(data['annotations'])} annotations, "
                f"{len(data['categories'])} categories → {out}")
    return out


# ---------------------------------------------------------------- split

def split(annotations: str | Path, *, out_dir: str | Path, labeled_fraction: float | None = None,
          labeled_ids: str | Path | None = None, seed: int = 0, val_fraction: float = 0.0,
          images_root: str | Path | None = None) -> dict[str, Path]:
    """Split a COCO instances json into labeled / unlabeled (/ val) parts (what ``castseg split`` does).

    The val set is drawn first and does not depend on the labeled fraction; labeled sets for
    growing fractions with one seed are nested (see :mod:`castseg.data.split`). Outputs keep the
    file names and record the images folder in a top-level ``"images_root"`` key, so they load
    from anywhere. Logs a summary, and a warning for each file in ``out_dir`` left from an
    earlier split that this one has no such part for.

    Args:
        annotations: the COCO instances json to split.
        out_dir: folder for the outputs (created).
        labeled_fraction: fraction in (0, 1] of the non-val images to keep labeled (at least one
            image). Exactly one of this and ``labeled_ids``.
        labeled_ids: an explicit labeled list instead (e.g. Guided Distillation's
            ``perc_10.txt``): a text file, one file name, stem or path per line.
        seed: the split seed.
        val_fraction: fraction in [0, 1) of all images held out as ``val.json``.
        images_root: folder the input's file names are relative to (default: its
            ``"images_root"`` key, else its folder).

    Returns:
        The written files by part: ``"labeled"`` (images + annotations), ``"unlabeled"`` (images
        only, no ``annotations`` key), ``"unlabeled_gt"`` (those images' own annotations, to score
        pseudo-labels with; only when the input annotates them), ``"val"`` (only with a val
        split) and ``"split"`` (``split.json``: seed, fractions, counts, image ids).

    Raises:
        InputError: a fraction out of range, an empty or unmatched labeled list, an output that
            would overwrite the input, or a bad input file.

    Examples:
        >>> ann = convert("mask-folders", "cells", out="cells.json")
        >>> files = split(ann, out_dir="splits", labeled_fraction=0.5, val_fraction=0.25, seed=0)
        >>> sorted(files)
        ['labeled', 'split', 'unlabeled', 'unlabeled_gt', 'val']
        >>> files["labeled"].name
        'labeled.json'
        >>> import json
        >>> json.loads(files["split"].read_text())["counts"]  # doctest: +ELLIPSIS
        {'images': 3, 'labeled': 1, 'unlabeled': 1, 'val': 1, ...}
    """
    from castseg.data.coco_io import load_coco
    from castseg.data.split import make_split, match_labeled_ids, read_id_list, stale_outputs, write_split

    if (labeled_fraction is None) == (labeled_ids is None):
        raise InputError(None, "give exactly one of labeled_fraction (--labeled-fraction) and labeled_ids "
                               "(--labeled-ids)")
    coco = load_coco(annotations, images_root=images_root)
    ids = None
    if labeled_ids is not None:
        ids = match_labeled_ids(coco, read_id_list(labeled_ids), labeled_ids)
    parts = make_split(coco, seed=seed, labeled_fraction=labeled_fraction, val_fraction=val_fraction,
                       labeled_ids=ids)
    written = write_split(coco, parts, out_dir, seed, labeled_fraction, val_fraction, labeled_ids)
    files = {("split" if name == "manifest" else name): path for name, path in written.items()}
    n_pool = len(parts.labeled) + len(parts.unlabeled)
    logger.info(f"split {annotations}: {len(coco.images)} images -> labeled {len(parts.labeled)} "
                f"({100.0 * len(parts.labeled) / n_pool:.1f}% of {n_pool}), unlabeled {len(parts.unlabeled)}, "
                f"val {len(parts.val)}; wrote {', '.join(str(p) for p in files.values())}")
    for path in stale_outputs(out_dir, parts, coco):
        logger.warning(f"{path} is from an earlier run; this split has no such part (see split.json)")
    return files


# ---------------------------------------------------------------- evaluate

def evaluate(predictions: str | Path | list[dict[str, Any]], annotations: str | Path | dict[str, Any] | CocoData,
             *, protocol: str = "coco", iou_type: str = "segm", max_dets: int = 100,
             gt_folder: str | Path | None = None, images_root: str | Path | None = None) -> dict[str, Any]:
    """Score predictions against ground truth (what ``castseg eval`` does).

    Args:
        predictions: a COCO results json, or its list of records: ``{"image_id", "category_id",
            "score", "segmentation"}`` (an RLE of the image's size ``[H, W]``) and, for
            ``iou_type="bbox"``, ``"bbox"`` (``[x, y, w, h]``).
        annotations: the ground truth: a COCO instances json (path, parsed dict or
            :class:`~castseg.data.coco_io.CocoData`). All its images are evaluated. For the
            cityscapes protocol, the json ``castseg convert cityscapes`` wrote: its images (ids,
            sizes, ``leftImg8bit/...`` file names) define what is scored.
        protocol: ``"coco"``: COCO AP/AR with COCO's default parameters (faster-coco-eval);
            ``"cityscapes"``: the official Cityscapes instance-level AP (category ids must be
            Cityscapes label ids; needs ``gt_folder``).
        iou_type: ``"segm"`` (mask IoU) or ``"bbox"`` (box IoU; coco protocol only).
        max_dets: detections per image that count (coco protocol; COCO's default 100, at least 10).
            Dense scenes such as nuclei need more, or recall is capped; ``AR100`` then means AR@N.
        gt_folder: cityscapes protocol only: the ``gtFine`` folder
            (``<split>/<city>/*_gtFine_instanceIds.png``).
        images_root: folder the ground truth's file names are relative to; accepted for symmetry,
            evaluation reads no images.

    Returns:
        coco protocol: ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
        "ARs", "ARm", "ARl"}`` as floats in [0, 1], ``-1.0`` where COCO leaves a number undefined
        (e.g. no ground truth of that size); no predictions give 0. cityscapes protocol:
        ``{"AP": float, "AP50": float, "per_class": {name: {"AP": float, "AP50": float}}}``.

    Raises:
        InputError: a bad results or ground-truth file (one line naming the file and the record),
            or options that do not fit the protocol.

    Examples:
        >>> ann = convert("mask-folders", "cells", out="cells.json")
        >>> import json
        >>> gt = json.loads(ann.read_text())
        >>> perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
        ...             "segmentation": a["segmentation"]} for a in gt["annotations"]]
        >>> stats = evaluate(perfect, ann)
        >>> stats["AP"], stats["AR100"], stats["APl"]  # the cells are small: no large ones to score
        (1.0, 1.0, -1.0)
        >>> evaluate(perfect[:3], ann, max_dets=200)["AR100"] < 1.0
        True
    """
    if protocol not in PROTOCOLS:
        raise InputError(None, f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "cityscapes":
        from castseg.eval.cityscapes_eval import evaluate_cityscapes

        if gt_folder is None:
            raise InputError(None, "the cityscapes protocol (--protocol cityscapes) needs gt_folder (--gt-folder), "
                                   "the gtFine folder")
        if iou_type != "segm":
            raise InputError(None, f"the cityscapes protocol evaluates masks only; drop iou_type {iou_type!r} "
                                   f"(--iou-type {iou_type})")
        return evaluate_cityscapes(gt_folder, annotations, predictions)

    from castseg.eval.coco_eval import evaluate_coco

    if gt_folder is not None:
        raise InputError(None, "gt_folder (--gt-folder) is for the cityscapes protocol (--protocol cityscapes)")
    return evaluate_coco(annotations, predictions, iou_type, images_root=images_root, max_dets=max_dets)


# ---------------------------------------------------------------- pseudo_label

def pseudo_label(teacher: str | Path | Teacher | None = None, *, images: str | Path, out: str | Path,
                 predictions: str | Path | None = None, images_root: str | Path | None = None,
                 class_names: list[str] | None = None, batch_size: int = 1, device: str = "auto",
                 min_score: float = 0.05, chunk_size: int = 64, max_size: int | None = None, workers: int = 0,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Cache a frozen teacher's instances on unlabeled images (what ``castseg pseudo-label`` does).

    Writes ``out`` (COCO results: RLE masks, scores, category ids) and ``out.manifest.json``.
    Score thresholds for training are applied when the cache is read, so it is made once per
    teacher; a finished cache of the same teacher, images and settings is reused, an interrupted
    one resumed (chunk by chunk). Under ``torchrun`` each process labels its share of the chunks on
    its own GPU. With ``predictions`` instead of a teacher the same cache is written from another
    model's COCO results (or from a COCO json, its annotations at score 1). Logs a summary line.

    Args:
        teacher: a castseg checkpoint (folder / ``model.json``), a teacher folder (``teacher.json``)
            or a teacher config (``.yaml`` / ``.json`` with ``type``, optionally under
            ``teacher:``); or a teacher object (:class:`castseg.models.teacher.Teacher`:
            ``predict(images [B, 3, H, W] in [0, 1], class_names)`` → per image ``masks`` bool
            ``[K, H, W]``, ``scores`` ``[K]``, ``labels`` ``[K]``), used as it is (on its own device).
            Exactly one of ``teacher`` and ``predictions``.
        images: the unlabeled images: a COCO json (its ``images``) or a folder of images.
        out: the cache to write, e.g. ``pseudo.json``.
        predictions: instead of a teacher: a COCO results json of a model run elsewhere, or a COCO
            json whose annotations become pseudo-labels at score 1 (matched by file name).
        images_root: for a COCO json ``images``: the folder its file names are relative to.
        class_names: classes to label (default: the teacher's, else the images json's categories;
            with ``predictions`` and a folder of images: category ids 1..C).
        batch_size: images per teacher forward (1: padding in mixed-size batches changes ViT outputs).
        device: where a teacher given as a path runs: ``"auto"`` (a GPU if there is one, else the
            CPU; under torchrun this process's GPU), ``"cpu"``, ``"cuda:1"``...
        min_score: keep instances scoring at least this (a floor that bounds the file size).
        chunk_size: images per part file: the unit of progress saved and of resuming.
        max_size: resize so the longest side is at most this for the teacher (masks are saved at
            the full image size).
        workers: threads decoding images ahead of the teacher.
        overwrite: discard an existing cache or unfinished pass made with other settings (else
            that is an error).
        progress: show a progress bar (on a terminal; plain lines otherwise).

    Returns:
        The cache's manifest: ``num_images``, ``num_instances``, ``min_score``, ``finished``, the
        teacher's fingerprint and config, the classes and the settings used.

    Raises:
        InputError: ``images`` or the teacher not found, both or neither of ``teacher`` and
            ``predictions``, bad images or predictions, or a cache made with other settings
            (without ``overwrite``).

    Examples:
        >>> ann = convert("mask-folders", "cells", out="cells.json")
        >>> manifest = pseudo_label(predictions=ann, images=ann, out="pseudo.json")
        >>> manifest["num_images"], manifest["num_instances"], manifest["finished"]
        (3, 9, True)
        >>> from castseg.pseudo_labels import load_pseudo_labels
        >>> cache = load_pseudo_labels("pseudo.json", ann, score_threshold=0.5)
        >>> sorted(len(v["masks"]) for v in cache.values())
        [2, 3, 4]
    """
    from castseg.pseudo_labels import dist_info, generate_pseudo_labels, import_pseudo_labels, load_teacher

    if (teacher is None) == (predictions is None):
        raise InputError(None, "give exactly one of teacher (--teacher) and predictions (--predictions)")
    if not Path(images).exists():  # before loading a possibly large teacher
        raise InputError(images, "not found (expected a COCO json or a folder of images)")
    if predictions is not None:
        manifest = import_pseudo_labels(predictions, images, out, images_root=images_root, class_names=class_names,
                                        min_score=min_score, overwrite=overwrite)
        logger.info(f"imported {manifest['num_instances']} instances with score >= {manifest['min_score']} on "
                    f"{manifest['num_images']} images -> {out}")
        return manifest

    # Initialise the process group first: under torchrun each rank picks its own GPU.
    rank, world = dist_info()
    info = None
    if isinstance(teacher, (str, os.PathLike)):
        teacher, info = load_teacher(teacher, device=device)  # resolved per rank (cuda:LOCAL_RANK)
    manifest = generate_pseudo_labels(
        teacher, images, out, teacher_info=info, images_root=images_root, class_names=class_names,
        batch_size=batch_size, min_score=min_score, chunk_size=chunk_size, max_size=max_size,
        overwrite=overwrite, progress=progress, num_workers=workers)
    if rank == 0:
        logger.info(f"pseudo-labelled {manifest['num_images']} images: {manifest['num_instances']} instances with "
                    f"score >= {manifest['min_score']} -> {out}" + (f" ({world} processes)" if world > 1 else ""))
    return manifest
