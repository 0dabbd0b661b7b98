"""How much of a protocol run's refined − supervised-only difference is val-set noise (not a test).

For each seed's run folder (``<out>/<protocol>/<variant>_s<seed>``, as ``dsb_protocol.py``
writes it) this predicts the val images once with the refined and the supervised-only student,
checks that the recomputed AP is the run's ``metrics.json`` one (to 0.01 AP point: float
summation order), then redraws the val images with
replacement (the same draw for both students, so the difference stays paired) and scores both
students on every draw. The spread of the per-draw differences is the standard error that the
val images alone put on that seed's difference; over seeds it is ``sqrt(sum se_i^2) / n`` for
the mean. Compare it with the standard error across seeds: where the two are alike, more val
images (not more seeds or a better teacher) are what shrinks the error bar.

    python benchmarks/paired_bootstrap.py --out runs/curves --variant table1_clean --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from castseg.config import load_config
from castseg.errors import CastsegError
from castseg.eval.coco_eval import evaluate_coco, load_gt
from castseg.evaluate import evaluate_model
from castseg.pseudo_labels import load_teacher
from castseg.trainable import val_kwargs

ROWS = {"refined": "student_refined", "supervised": "student_supervised"}


def predictions(run_dir: Path) -> dict[str, list[dict]]:
    """Val result records of each row's checkpoint, cached beside the run (``bootstrap/``)."""
    cfg = load_config(run_dir / "config.yaml")
    done = run_dir / "metrics.json"
    metrics = json.loads(done.read_text()) if done.is_file() else {}
    missing = [key for key in ROWS.values() if key not in metrics]
    if missing:
        raise SystemExit(f"{done}: lacks {', '.join(missing)} (run the variant to its end first)")
    out = {}
    for row, key in ROWS.items():
        path = run_dir / "bootstrap" / f"{row}.results.json"
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            teacher, _ = load_teacher(metrics[key]["checkpoint"], fingerprint=False)
            stats = evaluate_model(teacher.trainable().module(), cfg.data.val, results_path=path, **val_kwargs(cfg))
            if not math.isclose(stats["AP"], metrics[key]["AP"], abs_tol=1e-4):
                raise SystemExit(f"{run_dir}: {row} AP {stats['AP']:.6f} here, {metrics[key]['AP']:.6f} in metrics.json")
        out[row] = json.loads(path.read_text())
    return out


def redrawn(gt: dict, records: list[dict], draw: np.ndarray) -> tuple[dict, list[dict]]:
    """GT and records on the val images ``draw`` (image ids, repeats allowed), each drawn image a
    new id so a repeat counts twice."""
    anns = {i: [] for i in draw}
    for a in gt["annotations"]:
        if a["image_id"] in anns:
            anns[a["image_id"]].append(a)
    dets = {i: [] for i in draw}
    for r in records:
        if r["image_id"] in dets:
            dets[r["image_id"]].append(r)
    images = {im["id"]: im for im in gt["images"]}
    new_gt = {**gt, "images": [], "annotations": []}
    new_records = []
    for new_id, old_id in enumerate(draw, start=1):
        new_gt["images"].append({**images[old_id], "id": new_id})
        new_gt["annotations"] += [{**a, "id": len(new_gt["annotations"]) + k + 1, "image_id": new_id}
                                  for k, a in enumerate(anns[old_id])]
        new_records += [{**r, "image_id": new_id} for r in dets[old_id]]
    return new_gt, new_records


def bootstrap(run_dir: Path, draws: int, seed: int) -> dict[str, float]:
    cfg = load_config(run_dir / "config.yaml")
    gt = load_gt(cfg.data.val).to_dict()
    preds = predictions(run_dir)
    full = {row: evaluate_coco(gt, recs, max_dets=cfg.eval.max_dets)["AP"] for row, recs in preds.items()}
    ids = np.array([im["id"] for im in gt["images"]])
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        draw = rng.choice(ids, size=len(ids), replace=True)
        ap = {}
        for row, recs in preds.items():
            g, r = redrawn(gt, recs, draw)
            ap[row] = evaluate_coco(g, r, max_dets=cfg.eval.max_dets)["AP"]
        diffs.append(100 * (ap["refined"] - ap["supervised"]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": 100 * (full["refined"] - full["supervised"]), "val_se": statistics.stdev(diffs),
            "lo": float(lo), "hi": float(hi), "images": len(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--protocol", default="domain")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--draws", type=int, default=200)
    args = ap.parse_args()
    rows = {s: bootstrap(args.out / args.protocol / f"{args.variant}_s{s}", args.draws, seed=s) for s in args.seeds}
    print(f"**{args.variant}: refined − supervised-only, mask AP (%), {args.draws} val redraws per seed**\n")
    print("| seed | val images | difference | standard error from the val images | 95 % of redraws |")
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        print(f"| {s} | {r['images']} | {r['difference']:+.2f} | {r['val_se']:.2f} | {r['lo']:+.2f} to {r['hi']:+.2f} |")
    d = [r["difference"] for r in rows.values()]
    n = len(d)
    across = statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
    val_only = math.sqrt(sum(r["val_se"] ** 2 for r in rows.values())) / n
    print(f"\nMean {statistics.mean(d):+.2f}; its standard error across seeds {across:.2f}, "
          f"from the val images alone {val_only:.2f}")


if __name__ == "__main__":
    try:
        main()
    except CastsegError as e:  # e.g. no such run folder: one line, no traceback
        print(f"paired_bootstrap: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
