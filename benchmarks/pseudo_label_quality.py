"""Precision, recall and the kinds of error of cached pseudo-labels against the unlabeled images'
own labels, per score threshold, raw and (with ``--overlaps`` / ``--split`` / ``--min-area``)
cleaned as the student would see them (not a test; the counting is
:mod:`castseg.eval.pseudo_label_quality`, which every run with ``data.unlabeled_gt`` records at
``loss.score_threshold``; the cleaning is :mod:`castseg.pseudo_labels.clean`)::

    python benchmarks/pseudo_label_quality.py --gt runs/dsb_protocol_v3/splits/domain_s0_10/unlabeled_gt.json \\
        --caches runs/dsb_protocol_v3/domain/table1_s0/pseudo_labels/{adapt_a,teacher}.json
    python benchmarks/pseudo_label_quality.py --gt runs/curves/splits/domain_s0_10/unlabeled_gt.json \\
        --caches runs/curves/domain/noadapt_s0/pseudo_labels/teacher.json --thresholds 0.3 \\
        --overlaps exclusive --split --min-area 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

from castseg.data.coco_io import load_coco, read_json
from castseg.eval.coco_eval import evaluate_coco
from castseg.eval.pseudo_label_quality import label_quality
from castseg.pseudo_labels.clean import Cleanup, clean_records


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", type=Path, required=True, help="the unlabeled images' own labels (unlabeled_gt.json)")
    ap.add_argument("--caches", type=Path, nargs="+", required=True, help="pseudo-label caches (COCO results)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--overlaps", choices=["keep", "exclusive"], default="keep")
    ap.add_argument("--split", action="store_true", help="split pieces and touching convex objects")
    ap.add_argument("--min-area", type=int, default=0)
    ap.add_argument("--max-dets", type=int, default=100, help="AP's detections per image (the protocol's eval)")
    args = ap.parse_args()
    cleanups = [("raw", Cleanup())]
    chosen = Cleanup(overlaps=args.overlaps, split_touching=args.split, min_area=args.min_area)
    if chosen.active:
        cleanups.append(("cleaned", chosen))
    gt = load_coco(args.gt)
    print(f"| cache | score ≥ | instances | AP (%) | AP50 (%) | pseudo-labels | matched (IoU ≥ 0.5) | precision "
          f"| recall (of {len(gt.annotations)}) | merged (≥ 2 nuclei) | off target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cache in args.caches:
        records = read_json(cache)
        for th in args.thresholds:
            for name, cleanup in cleanups:
                kept = clean_records(records, cleanup, th)
                q, s = label_quality(gt, kept, th), evaluate_coco(gt, kept, max_dets=args.max_dets)
                print(f"| {cache.parent.parent.name}/{cache.name} | {th:g} | {name} | {100 * s['AP']:.2f} "
                      f"| {100 * s['AP50']:.2f} | {q['pseudo_labels']} | {q['matched']} | {q['precision']:.2f} "
                      f"| {q['recall']:.2f} | {q['merged']} | {q['off_target']} |", flush=True)


if __name__ == "__main__":
    main()
