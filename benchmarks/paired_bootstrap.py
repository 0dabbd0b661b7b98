"""How much of a protocol run's refined − supervised-only difference is val-set noise (not a test).

For each seed's run folder (``<out>/<protocol>/<variant>_s<seed>``, as ``dsb_protocol.py``
writes it) this predicts the val images once with the refined and the supervised-only student
(cached in the run's ``bootstrap/``), checks on every call that their AP is the run's
``metrics.json`` one (to 0.01 AP point: float summation order), then redraws the val images with
replacement (the same draw for both students, so the difference stays paired) and scores both
students on every draw. The spread of the per-draw differences is the standard error that the
val images alone put on that seed's difference; over seeds it is ``sqrt(sum se_i^2) / n`` for
the mean. Compare it with the standard error across seeds: where the two are alike, more val
images (not more seeds or a better teacher) are what shrinks the error bar.

    python benchmarks/paired_bootstrap.py --out runs/curves --variant table1_clean --seeds 0 1 2
    python benchmarks/paired_bootstrap.py --out runs/long2000 --variant oracle --baseline supervised

``--variant oracle`` pairs the oracle student (all train labels) with the supervised-only student
of the seed's ``--baseline`` run folder (same split, val images and budget); every other variant
pairs its own refined and supervised-only rows.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from castseg.config import RunConfig, load_config
from castseg.data.coco_io import CocoData
from castseg.errors import CastsegError
from castseg.eval.coco_eval import evaluate_coco, load_gt
from castseg.evaluate import evaluate_model
from castseg.pseudo_labels import load_teacher
from castseg.trainable import trainable_for, val_kwargs

Row = tuple[Path, str]  # (run folder, metrics.json key of the student's row)


def pair(out: Path, protocol: str, variant: str, baseline: str | None, seed: int) -> dict[str, Row]:
    """The two students of one seed to compare: ``treated`` − ``supervised``. The oracle's run
    folder has no supervised-only student of its own: it pairs with ``baseline`` (default
    ``supervised``); every other variant with its own folder's."""
    oracle = variant == "oracle"
    treated = (out / protocol / f"{variant}_s{seed}", "student_oracle" if oracle else "student_refined")
    baseline = baseline or ("supervised" if oracle else variant)
    return {"treated": treated, "supervised": (out / protocol / f"{baseline}_s{seed}", "student_supervised")}


def row_metrics(row: Row) -> dict:
    run_dir, key = row
    done = run_dir / "metrics.json"
    metrics = json.loads(done.read_text()) if done.is_file() else {}
    if key not in metrics:
        raise SystemExit(f"{done}: lacks {key} (run the variant to its end first)")
    return metrics[key]


def predictions(row: Row, cfg: RunConfig, metrics: dict) -> list[dict]:
    """Val result records of the row's checkpoint, cached beside its run (``bootstrap/``)."""
    path = row[0] / "bootstrap" / f"{row[1]}.results.json"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        teacher, _ = load_teacher(metrics["checkpoint"], fingerprint=False)
        evaluate_model(trainable_for(teacher).module(), cfg.data.val, results_path=path, **val_kwargs(cfg))
    return json.loads(path.read_text())


def redrawn(gt: CocoData, dets_by_image: dict[int, list[dict]], draw: np.ndarray) -> tuple[dict, list[dict]]:
    """GT (a COCO dict) and records on the val images ``draw`` (image ids, repeats allowed), each
    drawn image a new id so a repeat counts twice."""
    new_gt = {**gt.to_dict(with_annotations=False), "images": [], "annotations": []}
    new_records = []
    for new_id, old_id in enumerate(draw.tolist(), start=1):
        new_gt["images"].append({**gt.image_by_id[old_id], "id": new_id})
        new_gt["annotations"] += [{**a, "id": len(new_gt["annotations"]) + k + 1, "image_id": new_id}
                                  for k, a in enumerate(gt.anns_by_image[old_id])]
        new_records += [{**r, "image_id": new_id} for r in dets_by_image[old_id]]
    return new_gt, new_records


def bootstrap(rows: dict[str, Row], draws: int, seed: int) -> dict[str, float]:
    cfg = load_config(rows["treated"][0] / "config.yaml")
    base_cfg = load_config(rows["supervised"][0] / "config.yaml")
    if Path(base_cfg.data.val).resolve() != Path(cfg.data.val).resolve():
        raise SystemExit(f"{rows['supervised'][0]}: its val set is not {rows['treated'][0]}'s")
    # the oracle trains with the supervised stage's budget too: a pair must share it
    steps = {name: c.stage_train("supervised").max_steps for name, c in (("treated", cfg), ("supervised", base_cfg))}
    if steps["treated"] != steps["supervised"]:
        raise SystemExit(f"{rows['supervised'][0]}: supervised budget {steps['supervised']} steps, "
                         f"{rows['treated'][0]}'s is {steps['treated']}")
    metrics = {name: row_metrics(row) for name, row in rows.items()}
    gt = load_gt(cfg.data.val)
    preds = {name: predictions(row, cfg, metrics[name]) for name, row in rows.items()}
    full = {name: evaluate_coco(gt, recs, max_dets=cfg.eval.max_dets)["AP"] for name, recs in preds.items()}
    for name, (run_dir, key) in rows.items():  # cached predictions too: a stale cache must not change the numbers
        if not math.isclose(full[name], metrics[name]["AP"], abs_tol=1e-4):
            raise SystemExit(f"{run_dir}: {key} AP {full[name]:.6f} here, {metrics[name]['AP']:.6f} in metrics.json")
    by_image = {name: {i: [r for r in recs if r["image_id"] == i] for i in gt.image_by_id}
                for name, recs in preds.items()}
    ids = np.array(list(gt.image_by_id))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        draw = rng.choice(ids, size=len(ids), replace=True)
        ap = {}
        for name in preds:
            g, r = redrawn(gt, by_image[name], draw)
            ap[name] = evaluate_coco(g, r, max_dets=cfg.eval.max_dets)["AP"]
        diffs.append(100 * (ap["treated"] - ap["supervised"]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": 100 * (full["treated"] - full["supervised"]), "val_se": statistics.stdev(diffs),
            "lo": float(lo), "hi": float(hi), "images": len(ids)}


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--protocol", default="domain")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--baseline", help="the variant whose run folder holds the supervised-only student "
                                       "(default: --variant's own; `supervised` for --variant oracle)")
    args = ap.parse_args()
    pairs = {s: pair(args.out, args.protocol, args.variant, args.baseline, s) for s in args.seeds}
    rows = {s: bootstrap(p, args.draws, seed=s) for s, p in pairs.items()}
    treated = pairs[args.seeds[0]]["treated"][1].removeprefix("student_")
    print(f"**{args.variant}: {treated} − supervised-only, mask AP (%), {args.draws} val redraws per seed**\n")
    print("| seed | val images | difference | standard error from the val images | 95 % of redraws |")
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        print(f"| {s} | {r['images']} | {r['difference']:+.2f} | {r['val_se']:.2f} | {r['lo']:+.2f} to {r['hi']:+.2f} |")
    d = [r["difference"] for r in rows.values()]
    n = len(d)
    across = f"{statistics.stdev(d) / math.sqrt(n):.2f}" if n > 1 else "— (one seed)"
    val_only = math.sqrt(sum(r["val_se"] ** 2 for r in rows.values())) / n
    print(f"\nMean {statistics.mean(d):+.2f}; its standard error across seeds {across}, "
          f"from the val images alone {val_only:.2f}")


if __name__ == "__main__":
    try:
        main()
    except CastsegError as e:  # e.g. no such run folder: one line, no traceback
        print(f"paired_bootstrap: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
