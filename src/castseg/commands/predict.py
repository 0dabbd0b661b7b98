"""``castseg predict``: instances for new images from a student, a teacher or an ONNX file.

Writes ``predictions.json`` (COCO results, RLE), one overlay PNG per image (``overlays/``) and,
with ``--label-maps``, a uint16 instance-id PNG per image (``labels/``; 0 = background, higher
scores drawn last so they win overlaps).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="predict instances on images (student, teacher or ONNX)",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="castseg checkpoint (model.json / folder) or teacher folder (teacher.json)")
    src.add_argument("--onnx", help="model exported by `castseg export`")
    p.add_argument("--images", required=True, help="image file, folder (recursive), glob pattern, or COCO json")
    p.add_argument("--images-root", default=None, help="for a COCO json: folder its file names are relative to")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--score-threshold", type=float, default=0.3, help="drop instances below this score (default 0.3)")
    p.add_argument("--max-instances", type=int, default=100, help="keep at most this many per image (default 100)")
    p.add_argument("--max-size", type=int, default=None, help="resize so the longest side is at most this")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one, else the CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--label-maps", action="store_true", help="also write uint16 instance-id PNGs")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from castseg.api import load
    from castseg.console import Progress
    from castseg.data.dataset import list_image_inputs
    from castseg.data.images import read_image
    from castseg.eval.results import write_results

    model = load(args.onnx or args.checkpoint, device=args.device, topk=args.max_instances)
    items, cat_by_name = list_image_inputs(args.images, args.images_root)
    cat_ids = category_ids(model.class_names, cat_by_name, args.images)
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if args.label_maps:
        (out / "labels").mkdir(parents=True, exist_ok=True)

    records = []
    bar = Progress(len(items), "predict")
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        raws = [read_image(p) for _, _, p in chunk]
        results = model.predict(raws, score_threshold=args.score_threshold, max_size=args.max_size,
                                max_instances=args.max_instances, batch_size=args.batch_size)
        for (image_id, name, _), raw, r in zip(chunk, raws, results):
            records += write_image_outputs(args, out, image_id, name, raw, r, cat_ids)
        bar.update(len(chunk))
    bar.close()
    write_results(records, out / "predictions.json")
    logger.info(f"predicted {len(records)} instances on {len(items)} images ({model.kind}: "
                f"{args.onnx or args.checkpoint}) -> {out / 'predictions.json'}")
    return 0


def category_ids(names: list[str], cat_by_name: dict[str, int] | None, spec: str) -> list[int]:
    """The COCO category id of each model class: the input json's, by name, or 1..C."""
    from castseg.errors import InputError

    if cat_by_name is None:
        return list(range(1, len(names) + 1))
    missing = [n for n in names if n not in cat_by_name]
    if missing:
        raise InputError(spec, f"has no category for the model's classes {missing}")
    return [cat_by_name[n] for n in names]


def write_image_outputs(args: argparse.Namespace, out: Path, image_id: int, name: str, raw, result,
                        cat_ids: list[int]) -> list[dict]:
    """One image's instances (:class:`castseg.api.Instances`, masks at the image's size) as COCO
    results, with its overlay and label-map PNGs when asked."""
    import numpy as np
    from PIL import Image

    from castseg.visualize import draw_instances

    h, w = raw.shape[:2]
    stem = Path(name).with_suffix("").as_posix().replace("/", "__")
    m, s, lab = result.masks, result.scores, result.labels
    if not args.no_overlays:
        draw_instances(raw, m, s, [result.class_names[int(k)] for k in lab]).save(out / "overlays" / f"{stem}.png")
    if args.label_maps:
        ids = np.zeros((h, w), np.uint16)
        for k in np.argsort(s, kind="stable"):  # ascending: the best instance is drawn last
            ids[m[k]] = k + 1
        Image.fromarray(ids).save(out / "labels" / f"{stem}.png")
    return result.to_coco(image_id, cat_ids)
