"""``castseg predict``: instances for new images from a student, a teacher or an ONNX file.

Writes ``predictions.json`` (COCO results, RLE), one overlay PNG per image (``overlays/``) and,
with ``--label-maps``, a uint16 instance-id PNG per image (``labels/``; 0 = background, higher
scores drawn last so they win overlaps).
"""

from __future__ import annotations

import argparse
import glob
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


def list_images(spec: str, images_root: str | None) -> tuple[list[tuple[int, str, Path]], dict[str, int] | None]:
    """``(image_id, name, path)`` for every input image, and the category ids by class name when
    the input is a COCO json."""
    from castseg.data.coco_io import load_coco
    from castseg.data.dataset import list_image_folder
    from castseg.data.images import is_image_file
    from castseg.errors import InputError

    path = Path(spec)
    if path.is_dir():
        return [(i, f, path / f) for i, f in enumerate(list_image_folder(path), start=1)], None
    if path.is_file() and path.suffix.lower() == ".json":
        coco = load_coco(path, images_root, require_annotations=False)
        return ([(img["id"], img["file_name"], coco.image_path(img)) for img in coco.images],
                {c["name"]: c["id"] for c in coco.categories})
    if path.is_file():
        return [(1, path.name, path)], None
    matches = sorted(m for m in glob.glob(spec, recursive=True) if is_image_file(m) and Path(m).is_file())
    if not matches:
        raise InputError(spec, "no images found (expected an image, a folder, a glob pattern or a COCO json)")
    return [(i, m, Path(m)) for i, m in enumerate(matches, start=1)], None


def run(args: argparse.Namespace) -> int:
    import torch

    from castseg.console import Progress
    from castseg.data.images import read_image
    from castseg.eval.results import write_results
    from castseg.predictor import load_predictor, resize_for_model

    predictor = load_predictor(args.onnx or args.checkpoint, onnx=bool(args.onnx), device=args.device,
                               topk=args.max_instances, score_threshold=args.score_threshold)
    items, cat_by_name = list_images(args.images, args.images_root)
    cat_ids = category_ids(predictor.class_names, cat_by_name, args.images)
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if args.label_maps:
        (out / "labels").mkdir(parents=True, exist_ok=True)

    records = []
    bar = Progress(len(items), "predict")
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        raws = [read_image(p) for _, _, p in chunk]
        xs = [resize_for_model(r, args.max_size) for r in raws]
        # Batch only same-size images: padding here would differ from the model's own padding.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        results: list = [None] * len(xs)
        for idx in groups.values():
            for i, r in zip(idx, predictor(torch.stack([xs[i] for i in idx]))):
                results[i] = r
        for (image_id, name, _), raw, r in zip(chunk, raws, results):
            records += write_image_outputs(args, out, image_id, name, raw, r, cat_ids, predictor.class_names)
        bar.update(len(chunk))
    bar.close()
    write_results(records, out / "predictions.json")
    logger.info(f"predicted {len(records)} instances on {len(items)} images ({predictor.kind}: "
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


def write_image_outputs(args: argparse.Namespace, out: Path, image_id: int, name: str, raw, result: dict,
                        cat_ids: list[int], names: list[str]) -> list[dict]:
    """One image's kept instances (score, top-k; masks at the image's size [N,H,W]) as COCO
    results, with its overlay and label-map PNGs when asked."""
    import numpy as np
    from PIL import Image

    from castseg.eval.results import instances_to_results
    from castseg.models.inference import resize_masks
    from castseg.visualize import draw_instances

    h, w = raw.shape[:2]
    scores, labels = result["scores"].cpu(), result["labels"].cpu()
    keep = scores >= args.score_threshold
    masks = result["masks"].cpu()[keep][: args.max_instances]
    scores, labels = scores[keep][: args.max_instances], labels[keep][: args.max_instances]
    masks = resize_masks(masks, (h, w))
    categories = np.asarray(cat_ids, dtype=np.int64)[labels.numpy()] if len(labels) else np.zeros(0, np.int64)
    stem = Path(name).with_suffix("").as_posix().replace("/", "__")
    m, s, lab = masks.numpy(), scores.numpy(), labels.numpy()
    if not args.no_overlays:
        draw_instances(raw, m, s, [names[int(k)] for k in lab]).save(out / "overlays" / f"{stem}.png")
    if args.label_maps:
        ids = np.zeros((h, w), np.uint16)
        for k in np.argsort(s, kind="stable"):  # ascending: the best instance is drawn last
            ids[m[k]] = k + 1
        Image.fromarray(ids).save(out / "labels" / f"{stem}.png")
    return instances_to_results(image_id, masks, scores, categories)
