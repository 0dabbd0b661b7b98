"""Precision, recall and the kinds of error of cached pseudo-labels against the unlabeled images'
own labels, per score threshold (not a test; the counting is :mod:`castseg.eval.pseudo_label_quality`,
which every run with ``data.unlabeled_gt`` records at ``loss.score_threshold``)::

    python benchmarks/pseudo_label_quality.py --gt runs/dsb_protocol_v3/splits/domain_s0_10/unlabeled_gt.json \\
        --caches runs/dsb_protocol_v3/domain/table1_s0/pseudo_labels/{adapt_a,teacher}.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from castseg.data.coco_io import load_coco, read_json
from castseg.eval.pseudo_label_quality import label_quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", type=Path, required=True, help="the unlabeled images' own labels (unlabeled_gt.json)")
    ap.add_argument("--caches", type=Path, nargs="+", required=True, help="pseudo-label caches (COCO results)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    args = ap.parse_args()
    gt = load_coco(args.gt)
    print(f"| cache | score ≥ | pseudo-labels | matched (IoU ≥ 0.5) | precision | recall (of {len(gt.annotations)}) "
          "| merged (≥ 2 nuclei) | off target |")
    print("|---|---|---|---|---|---|---|---|")
    for cache in args.caches:
        records = read_json(cache)
        for th in args.thresholds:
            q = label_quality(gt, records, th)
            print(f"| {cache.name} | {th:g} | {q['pseudo_labels']} | {q['matched']} | {q['precision']:.2f} "
                  f"| {q['recall']:.2f} | {q['merged']} | {q['off_target']} |")


if __name__ == "__main__":
    main()
