"""Validation curves of the protocol's runs, and CAST's student minus the supervised-only one at
the same number of student steps, paired by seed (not a test).

Reads the ``val_metrics.jsonl`` that every stage of ``benchmarks/dsb_protocol.py`` writes when
run with ``train.val_every``. The CAST student's curve is stage 2's followed by stage 3's, which
continues its step count (distill 900 + refine 100 = 1000 student steps). The supervised-only
student of the same run folder, or, for ``oracle``, the ``supervised`` variant of the same seed,
is the baseline. ``--versus V`` adds each variant's CAST student minus variant V's, paired by
seed (e.g. the effect of cleaning the pseudo-labels)::

    python benchmarks/protocol_curves.py --out runs/curves --variants noadapt oracle
    python benchmarks/protocol_curves.py --out runs/curves --variants noadapt_clean --versus noadapt
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

Curve = dict[int, float]  # student step -> mask AP (%)


def read_curve(stage_dir: Path, offset: int = 0) -> Curve:
    f = stage_dir / "val_metrics.jsonl"
    if not f.is_file():
        return {}
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return {offset + r["step"]: 100 * r["AP"] for r in rows}


def cast_curve(run: Path) -> Curve:
    """Stage 2 then stage 3, on one student-step axis."""
    distill = read_curve(run / "distill")
    return {**distill, **read_curve(run / "refine", offset=max(distill, default=0))} if distill else {}


def baseline(run: Path, variant: str, last_step: int) -> Curve:
    """The supervised-only student to compare ``run`` with: its own, or (oracle) the seed's that
    reaches ``last_step`` (the oracle's)."""
    if variant != "oracle":
        return read_curve(run / "supervised")
    seed = run.name.rsplit("_s", 1)[1]
    for name in ("supervised", "noadapt", "table1"):  # the same split and schedule in each
        curve = read_curve(run.parent / f"{name}_s{seed}" / "supervised")
        if curve and max(curve) >= last_step:
            return curve
    return {}


def student(run: Path, variant: str) -> Curve:
    return read_curve(run / "supervised") if variant == "oracle" else cast_curve(run)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def _paired(diffs: dict[int, dict[int, float]], steps: list[int], seeds: int, name: str) -> tuple[str, list[int]]:
    """A table row of the paired differences at the steps where every seed has one."""
    every = [s for s in steps if len(diffs.get(s, {})) == seeds]
    return (f"| {name}, paired by seed | " + " | ".join(_fmt(list(diffs[s].values())) if s in every else ""
                                                        for s in steps) + " |"), every


def table(variant: str, runs: dict[int, Path], versus: tuple[str, dict[int, Path]] | None = None) -> list[str]:
    label = "oracle, all train labels" if variant == "oracle" else f"{variant}: distill → refine"
    rows, diffs, other = [], {}, {}
    for seed, run in sorted(runs.items()):
        mine = student(run, variant)
        base = baseline(run, variant, max(mine, default=0))
        rows += [(f"seed {seed}: {label}", mine), (f"seed {seed}: supervised-only", base)]
        for step in mine.keys() & base.keys():
            diffs.setdefault(step, {})[seed] = mine[step] - base[step]
        theirs = cast_curve(versus[1][seed]) if versus and seed in versus[1] else {}
        for step in mine.keys() & theirs.keys():
            other.setdefault(step, {})[seed] = mine[step] - theirs[step]
    steps = sorted({s for _, c in rows for s in c})
    if not steps:
        return []
    lines = [f"**{variant}** (mask AP %, seeds {sorted(runs)})", "",
             "| student step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
    lines += [f"| {name} | " + " | ".join(f"{c[s]:.2f}" if s in c else "" for s in steps) + " |" for name, c in rows]
    row, every = _paired(diffs, steps, len(runs), f"{label.split(':')[0]} − supervised-only")
    lines.append(row)
    if versus:
        lines.append(_paired(other, steps, len(runs), f"{variant} − {versus[0]}")[0])
    if every:
        last = diffs[every[-1]]
        lines += ["", f"At step {every[-1]}, per seed: " + ", ".join(f"{v:+.2f}" for _, v in sorted(last.items()))
                  + (f"; standard error {statistics.stdev(last.values()) / len(last) ** 0.5:.2f}" if len(last) > 1
                     else "")]
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the --out folder of dsb_protocol.py")
    ap.add_argument("--protocol", default="domain", choices=["domain", "dsb664"])
    ap.add_argument("--variants", nargs="+", default=["noadapt", "table1", "oracle"])
    ap.add_argument("--versus", help="a CAST variant to subtract from each, paired by seed and step")
    args = ap.parse_args()

    def runs_of(variant: str) -> dict[int, Path]:
        return {int(p.name.rsplit("_s", 1)[1]): p for p in sorted((args.out / args.protocol).glob(f"{variant}_s*"))
                if p.name.rsplit("_s", 1)[1].isdigit()}

    versus = (args.versus, runs_of(args.versus)) if args.versus else None
    for variant in args.variants:
        print("\n".join(table(variant, runs_of(variant), versus)))


if __name__ == "__main__":
    main()
