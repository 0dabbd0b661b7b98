"""Pseudo-label AP of a teacher with and without test-time augmentation (flipped views, fused).

    python benchmarks/bench_tta.py TEACHER_CKPT UNLABELED_JSON UNLABELED_GT_JSON [--views none h hv+v]

For example on a finished demo: ``runs/demo/adapt/c/checkpoints/last runs/demo/splits/unlabeled.json
runs/demo/splits/unlabeled_gt.json``. Prints mask AP / AP50 of each variant's pseudo-labels against
the unlabeled images' own annotations, and the wall time of each pass (ratio to no TTA).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

VIEWS = {"none": [], "h": ["h"], "h+v": ["h", "v"], "h+v+hv": ["h", "v", "hv"]}


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    from castseg.data.coco_io import load_coco
    from castseg.models.tta import with_tta
    from castseg.pseudo_labels import generate_pseudo_labels, load_teacher
    from castseg.run_checks import pseudo_label_ap

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("unlabeled")
    ap.add_argument("gt")
    ap.add_argument("--views", nargs="+", default=["none", "h", "h+v"], choices=list(VIEWS))
    ap.add_argument("--max-dets", type=int, default=300)
    args = ap.parse_args()
    gt = load_coco(args.gt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.views:
            teacher, info = load_teacher(args.teacher)
            if VIEWS[name]:
                teacher, info = with_tta(teacher, info, VIEWS[name])
            out = Path(tmp) / f"{name}.json"
            t = time.perf_counter()
            generate_pseudo_labels(teacher, args.unlabeled, out, teacher_info=info, progress=False)
            rows.append((name, pseudo_label_ap(gt, out, args.max_dets), time.perf_counter() - t))
    base = rows[0][2]
    print(f"\n{len(gt.images)} images, teacher {args.teacher}\n")
    print("| views | mask AP (%) | AP50 (%) | seconds | time vs first |")
    print("|---|---|---|---|---|")
    for name, stats, sec in rows:
        print(f"| {name} | {100 * stats['AP']:.2f} | {100 * stats['AP50']:.2f} | {sec:.0f} | {sec / base:.2f}x |")


if __name__ == "__main__":
    main()
