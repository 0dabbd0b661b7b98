"""The demo's settings, compared at the demo's budget on paired seeds (not a test).

Runs ``castseg.demo.run_demo`` once per seed and setting into ``<out>/<setting>_s<seed>`` (a
finished run is reused: re-running only adds what is missing) and prints, per seed and as the
paired mean ± standard deviation over seeds, every model's val AP and each setting's difference
to the first one. Issue #32 asks whether the pseudo-label cleaning measured as CAST's first gain
(BENCHMARKS.md, "pseudo-label cleaning") helps at the demo's budget:

    OMP_NUM_THREADS=1 python benchmarks/demo_settings.py --out runs/demo_settings --seeds 0 1 2

``--student`` starts the student from another θ_s⁰ checkpoint than the shipped stand-in (e.g. an
earlier phase, to compare stand-ins).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from castseg import console
from castseg.demo import run_demo

# The cleaning benchmarks/dsb_protocol.py chose on θ_T⁰'s caches of seeds 0/1/2 (its CLEAN).
SETTINGS = {
    "plain": [],
    "clean": ["loss.pseudo_label_overlaps=exclusive", "loss.pseudo_label_split=true", "loss.pseudo_label_min_area=64"],
}
ROWS = ("teacher_zero_shot", "teacher_adapted", "student_supervised", "student_distilled", "student_refined",
        "classical_baseline")


def run_one(out: Path, setting: str, seed: int, student: str | None) -> dict:
    folder = out / f"{setting}_s{seed}"
    done = folder / "metrics.json"
    if done.is_file() and "classical_baseline" in json.loads(done.read_text()):
        return json.loads(done.read_text())
    overrides = [*SETTINGS[setting], *([f"model.init_from={student}"] if student else [])]
    return run_demo(out=folder, overrides=overrides, seed=seed)["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_settings"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--student", default=None, help="θ_s⁰ checkpoint instead of the shipped stand-in")
    args = ap.parse_args()
    console.install()
    runs = {(s, seed): run_one(args.out, s, seed, args.student) for seed in args.seeds for s in args.settings}
    base = args.settings[0]
    print(f"| seed | setting | {' | '.join(ROWS)} | recommended |")
    print("|---|---|" + "---|" * (len(ROWS) + 1))
    for seed in args.seeds:
        for s in args.settings:
            m = runs[(s, seed)]
            cells = [f"{100 * m[k]['AP']:.2f}" if (m.get(k) or {}).get("AP") is not None else "—" for k in ROWS]
            rec = m.get("recommendation") or {}
            print(f"| {seed} | {s} | {' | '.join(cells)} | {rec.get('model', '—')} {100 * rec.get('AP', 0):.2f} |")
    for s in args.settings[1:]:
        for key in ("student_refined", "student_distilled", "teacher_adapted"):
            diffs = [100 * (runs[(s, seed)][key]["AP"] - runs[(base, seed)][key]["AP"]) for seed in args.seeds]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            print(f"{s} − {base}, {key}: paired mean {statistics.mean(diffs):+.2f} ± {sd:.2f} AP over seeds "
                  f"{args.seeds} ({', '.join(f'{d:+.2f}' for d in diffs)})")


if __name__ == "__main__":
    main()
