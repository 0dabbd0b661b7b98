"""COCO instance-segmentation / detection AP with faster-coco-eval.

:func:`evaluate_coco` is the one entry point, for the CLI and for training code alike (it takes
in-memory dicts/lists, so a validation loop needs no temp files). Results match pycocotools'
``COCOeval`` with default parameters: all GT image ids, all GT categories, maxDets 1/10/100.

Ground truth is checked *structurally* (:func:`load_gt`), not with the strict
:func:`castseg.data.coco_io.load_coco`: COCO's protocol uses each GT annotation's stored
``area`` for the small/medium/large ranges and the stored ``iscrowd`` flag, so recomputing or
rejecting them (as the strict loader does for training data) would change the official numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from castseg.data import masks as M
from castseg.data.coco_io import CocoData, annotation_refs, is_int, read_json
from castseg.errors import InputError
from castseg.eval.results import IOU_TYPES, validate_results

# The 12 numbers of COCOeval.summarize(), in its order.
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_STAT_LINES = (  # (precision or recall, IoU label, area, maxDets) as COCOeval prints them
    ("Average Precision  (AP)", "0.50:0.95", "all", 100), ("Average Precision  (AP)", "0.50", "all", 100),
    ("Average Precision  (AP)", "0.75", "all", 100), ("Average Precision  (AP)", "0.50:0.95", "small", 100),
    ("Average Precision  (AP)", "0.50:0.95", "medium", 100), ("Average Precision  (AP)", "0.50:0.95", "large", 100),
    ("Average Recall     (AR)", "0.50:0.95", "all", 1), ("Average Recall     (AR)", "0.50:0.95", "all", 10),
    ("Average Recall     (AR)", "0.50:0.95", "all", 100), ("Average Recall     (AR)", "0.50:0.95", "small", 100),
    ("Average Recall     (AR)", "0.50:0.95", "medium", 100), ("Average Recall     (AR)", "0.50:0.95", "large", 100),
)


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """faster-coco-eval reports progress through a print function; the CLI owns stdout."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_ann(ann: Any, i: int, images: dict[int, dict], cat_ids: set, iou_type: str | None,
               path: Path) -> dict[str, Any]:
    geometry = {"segm": ("segmentation",), "bbox": ("bbox",)}.get(iou_type or "", ())
    where, img = annotation_refs(ann, i, path, images, cat_ids, ("id", "image_id", "category_id") + geometry)
    seg = ann.get("segmentation")
    if seg is not None and not isinstance(seg, list):
        if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
            raise InputError(path, f"{where}: segmentation must be polygons or an RLE with 'size' and 'counts'")
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and list(size) == [img["height"], img["width"]]):
            raise InputError(path, f"{where}: RLE size {seg['size']} does not match the image size "
                             f"[{img['height']}, {img['width']}]")
    b = ann.get("bbox")
    if b is not None and not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)):
        raise InputError(path, f"{where}: bbox must be [x, y, w, h]")
    # Shallow copy: faster-coco-eval writes 'ignore' and cached RLEs into GT annotations, and a
    # caller's in-memory dataset must come back untouched.
    out = dict(ann)
    if "area" not in out:
        # COCO files always carry 'area'; fill it for hand-written GT the way COCO defines it.
        if seg is not None:
            out["area"] = float(M.area(M.segmentation_to_rle(seg, img["height"], img["width"], f"{path}: {where}")))
        elif b is not None:
            out["area"] = float(b[2] * b[3])
        else:
            raise InputError(path, f"{where}: needs 'area', 'segmentation' or 'bbox'")
    elif not _is_number(out["area"]):
        raise InputError(path, f"{where}: 'area' must be a number")
    return out


def load_gt(gt: str | Path | dict | CocoData, iou_type: str | None = "segm",
            images_root: str | Path | None = None, require_annotations: bool = True) -> CocoData:
    """Structurally check a COCO GT file or dict for evaluation and return it as :class:`CocoData`.

    Checks what evaluation relies on (image ids and sizes, category ids, annotation ids and
    references, the geometry ``iou_type`` needs, RLE sizes) and keeps stored ``area``/``iscrowd``
    as given; pixel data is not read. Annotations are shallow copies, safe to hand to the
    evaluator. ``iou_type=None`` skips the geometry requirement.
    """
    if isinstance(gt, CocoData):
        return gt
    path = Path(gt) if isinstance(gt, (str, Path)) else Path("<ground truth>")
    data = read_json(path) if isinstance(gt, (str, Path)) else gt
    if not isinstance(data, dict):
        raise InputError(path, f"not a COCO instances file (top level is a {type(data).__name__}, expected an object)")
    for key in ("images", "categories") + (("annotations",) if require_annotations else ()):
        if not isinstance(data.get(key), list):
            raise InputError(path, f"not a COCO instances file: '{key}' must be a list")
    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and is_int(img.get("id"))):
            raise InputError(path, f"image #{i}: must be an object with an integer 'id'")
        if not (is_int(img.get("height")) and is_int(img.get("width")) and img["height"] > 0 and img["width"] > 0):
            raise InputError(path, f"image #{i} (id={img['id']}): 'width' and 'height' must be positive integers")
        if img["id"] in images:
            raise InputError(path, f"duplicate image id {img['id']}")
        images[img["id"]] = img
    cat_ids: set = set()
    for i, cat in enumerate(data["categories"]):
        if not (isinstance(cat, dict) and is_int(cat.get("id"))):
            raise InputError(path, f"category #{i}: must be an object with an integer 'id'")
        if cat["id"] in cat_ids:
            raise InputError(path, f"duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
    anns = [_check_ann(a, i, images, cat_ids, iou_type, path) for i, a in enumerate(data.get("annotations", []))]
    seen: set = set()
    for a in anns:
        if a["id"] in seen:  # COCO indexes annotations by id; duplicates would silently vanish
            raise InputError(path, f"duplicate annotation id {a['id']}")
        seen.add(a["id"])
    cats = [dict(c, name=str(c.get("name", c["id"]))) for c in data["categories"]]
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    root = Path(images_root) if images_root is not None else path.parent
    return CocoData(path, root, info, list(data["images"]), cats, anns)


def evaluate_coco(gt: str | Path | dict | CocoData, pred: str | Path | list, iou_type: str = "segm",
                  images_root: str | Path | None = None, max_dets: int = 100) -> dict[str, float]:
    """COCO AP/AR of ``pred`` against ``gt``.

    Args:
        gt: COCO instances json path, parsed dict or :class:`CocoData`.
        pred: COCO results json path or list of result records (see :mod:`castseg.eval.results`).
        iou_type: ``"segm"`` (mask IoU) or ``"bbox"``.
        images_root: unused by the metric (no pixels are read); kept for the GT's bookkeeping.
        max_dets: detections per image that count (COCO: 100). Dense scenes (DSB2018 nuclei:
            up to 375 per image) need more, or recall is capped; ``AR100`` then means AR@max_dets.

    Returns:
        ``{AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}`` as fractions in
        [0, 1], ``-1.0`` where COCO leaves a number undefined (e.g. no GT of that size).
        An empty prediction list gives 0 wherever GT exists.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if iou_type not in IOU_TYPES:
        raise InputError(None, f"iou type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    data = load_gt(gt, iou_type, images_root)
    if isinstance(pred, (str, Path)):
        records = validate_results(read_json(pred), data, iou_type, pred)
    else:
        records = validate_results(pred, data, iou_type, "<predictions>")
    # loadRes picks the area used for small/medium/large from the first geometry it sees: with
    # a bbox present, mask AP would be binned by box area. Hand it only the geometry evaluated.
    geometry = "segmentation" if iou_type == "segm" else "bbox"
    dets = [{"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
             geometry: r[geometry]} for r in records]

    gt_dict = data.to_dict(with_annotations=False)
    # Shallow copies again: a CocoData passed in by a caller must not gain the evaluator's keys.
    gt_dict["annotations"] = [dict(a) for a in data.annotations]
    coco_gt = COCO(gt_dict, print_function=_quiet)
    coco_dt = coco_gt.loadRes(dets)
    coco_dt.print_function = _quiet
    ev = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_quiet)
    if max_dets != 100:
        if max_dets < 10:
            raise InputError(None, f"max detections must be at least 10, got {max_dets}")
        ev.params.maxDets = [1, 10, int(max_dets)]
    ev.run()
    return {k: float(v) for k, v in zip(STAT_KEYS, ev.stats[: len(STAT_KEYS)])}


def format_stats(stats: dict[str, float], max_dets: int = 100) -> str:
    """The 12 lines COCOeval.summarize() prints, from :func:`evaluate_coco`'s dict (``max_dets``
    as passed to it, so the labels say what was evaluated)."""
    lines = []
    for key, (title, iou, area, dets) in zip(STAT_KEYS, _STAT_LINES):
        dets = max_dets if dets == 100 else dets
        lines.append(f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = {stats[key]:0.3f}")
    return "\n".join(lines)
