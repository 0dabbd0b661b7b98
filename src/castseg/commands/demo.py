"""``castseg demo``: the main job on the embedded default dataset.

Until the three-stage pipeline lands, the demo runs the data and evaluation path end to end on
real data: validate the embedded DSB2018 histology set → seeded split (fixed val, 10% labeled)
→ weak/strong training views through a DataLoader → predictions of a training-free classical
baseline on val → COCO mask AP. Every artefact lands in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

from castseg.errors import CastsegError


def embedded_default() -> Path:
    """Annotation file of the dataset shipped inside the package."""
    path = Path(str(resources.files("castseg") / "assets" / "dsb2018_histology" / "annotations.json"))
    if not path.exists():
        raise CastsegError(f"the embedded default dataset is missing ({path}); reinstall castseg")
    return path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run the main job on the embedded default dataset",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data", default=None, help="COCO json to use instead of the embedded default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labeled-fraction", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--max-dets", type=int, default=300,
                   help="detections per image that count in AP (default 300: these images hold up "
                   "to 151 nuclei, COCO's 100 would cap recall)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few val images only")
    p.set_defaults(func=run)
    return p


def _step(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    # Heavy imports here, not at module level: every `castseg` verb imports this module.
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from castseg.baselines.classical import segment_nuclei
    from castseg.data.coco_io import load_coco, write_json
    from castseg.data.dataset import CocoInstanceDataset, collate_instances
    from castseg.data.images import read_image
    from castseg.data.split import make_split, write_split
    from castseg.data.transforms import WeakView
    from castseg.eval.coco_eval import evaluate_coco, format_stats
    from castseg.eval.results import instances_to_results, write_results

    t0 = time.perf_counter()
    out = Path(args.out)
    ann = Path(args.data) if args.data else embedded_default()
    n = 5

    _step(1, n, f"data: {ann}")
    coco = load_coco(ann)
    print(f"      {len(coco.images)} images, {len(coco.annotations)} instances, classes {coco.class_names}")

    _step(2, n, f"split: val {args.val_fraction:.0%}, labeled {args.labeled_fraction:.0%} of the rest, seed {args.seed}")
    split = make_split(coco, seed=args.seed, labeled_fraction=args.labeled_fraction, val_fraction=args.val_fraction)
    files = write_split(coco, split, out / "splits", args.seed, args.labeled_fraction, args.val_fraction)
    print(f"      labeled {len(split.labeled)}, unlabeled {len(split.unlabeled)}, val {len(split.val)} -> {out / 'splits'}")

    _step(3, n, "training views: weak (resize/crop/flip) + strong (photometric) through a DataLoader")
    torch.manual_seed(args.seed)
    ds = CocoInstanceDataset(files["labeled"], transform=WeakView(crop_size=(256, 256)), strong_view=True)
    batch = next(iter(DataLoader(ds, batch_size=min(4, len(ds)), shuffle=True, collate_fn=collate_instances)))
    counts = [int(t["masks"].shape[0]) for t in batch["targets"]]
    print(f"      batch images {list(batch['images'].shape)}, strong {list(batch['images_strong'].shape)}, "
          f"instances per image {counts}")

    val = load_coco(files["val"])
    images = val.images[:5] if args.quick else val.images
    _step(4, n, f"predict: classical baseline (Otsu + watershed) on {len(images)} val images")
    records = []
    for img in images:
        masks, scores = segment_nuclei(read_image(val.image_path(img)))
        cats = np.full(len(scores), val.categories[0]["id"])
        records += instances_to_results(img["id"], masks, scores, cats)
    pred_path = out / "predictions" / "classical_val.json"
    write_results(records, pred_path)

    _step(5, n, f"evaluate: COCO mask AP on val (up to {args.max_dets} detections per image)")
    gt = val.to_dict()
    if args.quick:
        keep = {img["id"] for img in images}
        gt["images"] = [i for i in gt["images"] if i["id"] in keep]
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    stats = evaluate_coco(gt, records, "segm", max_dets=args.max_dets)
    print(format_stats(stats, args.max_dets))
    metrics = {"classical_baseline": {"AP": stats["AP"], "AP50": stats["AP50"], "predictions": str(pred_path)},
               "val_images": len(images), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(metrics, out / "metrics.json", indent=1)
    print(f"\nclassical baseline on {len(images)} val images: mask AP {stats['AP']:.3f}, AP50 {stats['AP50']:.3f}")
    print(f"metrics: {out / 'metrics.json'}  ({metrics['seconds']} s)")
    print(json.dumps({"AP": round(stats["AP"], 4), "AP50": round(stats["AP50"], 4)}))
    return 0
