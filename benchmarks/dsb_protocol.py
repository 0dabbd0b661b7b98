"""The DSB2018 protocol benchmark: CAST's claims measured at CPU scale (not a test).

Two protocols, both starting from the pretrained stand-ins (``assets/standins``, trained on the
grey DSB2018 train images by ``tools/train_standins.py``) with the demo's CPU presets
(``assets/demo.yaml``):

- ``dsb664``: all 664 images of ../shared/data/dsb2018-stage1-train, a fixed seeded 85/15
  train/val split (``castseg split --seed 0 --val-fraction 0.15``), 10% of train labeled, the
  rest unlabeled. Caveat: the stand-ins were trained on the grey images of this train split
  (never on val), so here the "zero-shot" teacher is in-domain for most images.
- ``domain``: the domain-shift variant, closest to the paper: the same protocol on the colour
  (H&E histology) images only — the embedded default, a modality the stand-ins never saw.

Variants (``--variants``): ``table1`` (all stages + supervised-only: the Table-1 analogue),
``fractionF`` (table1 with F% labels), ``noadapt`` (distil from the un-adapted teacher, then
refine, and the supervised-only student beside it), ``noadapt_clean`` / ``table1_clean`` /
``fractionF_clean`` (noadapt / table1 / fractionF with the pseudo-labels cleaned: ``CLEAN``),
``loss_sup`` / ``loss_semi`` / ``loss_pxl`` (the student's loss terms: L_sup only, +L_semi,
+L_pxl; ``table1``'s distilled row is "all"), ``sampler_uniform`` / ``_mask`` /
``_class`` (L_pxl's negative sampler; ``table1`` is fused), ``supervised`` (the supervised-only
student alone), ``oracle`` (the supervised-only student on the labeled *and* the unlabeled
images' own labels, with the supervised budget: what a perfect teacher's pseudo-labels could give
at most; rendered beside ``table1``'s supervised-only row of the same seed), ``distill`` (stage 2
alone, all loss terms: e.g. its learning curve with ``train.val_every``), ``perfect_cache``
(stage 2 alone with the unlabeled images' own labels as the pseudo-label cache, score 1: a perfect
teacher through the very same L_semi path). Ablations distil from the adapted teacher of
``table1`` with the same seed.
Every run is a folder under ``--out`` and resumes.

    python benchmarks/dsb_protocol.py --protocol domain --variants table1 --seeds 0 1 2
    python benchmarks/dsb_protocol.py --protocol dsb664 --variants table1 noadapt fraction5 fraction30
    python benchmarks/dsb_protocol.py --protocol domain --variants loss_sup loss_semi loss_pxl
    python benchmarks/dsb_protocol.py --efficiency
    python benchmarks/dsb_protocol.py --render          # markdown tables of everything run so far
    python benchmarks/dsb_protocol.py --variants table1 --supervised-only &   # that arm on a second core
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from castseg.errors import CastsegError
from castseg.model_rows import MODEL_ROWS

ROOT = Path(__file__).resolve().parents[1]
DSB = ROOT.parent / "shared" / "data" / "dsb2018-stage1-train" / "stage1_train"
# protocol-specific settings on top of assets/demo.yaml
PROTOCOL_OVERRIDES = {
    "domain": [],
    # DSB images are up to 1388 px wide and hold up to 375 nuclei
    "dsb664": ["eval.max_dets=400", "eval.topk=200", "data.val_max_size=512", "pseudo_labels.max_size=512"],
}
# Pseudo-label cleaning (castseg.pseudo_labels.clean) as chosen on θ_T⁰'s caches of seeds 0/1/2:
# one instance per pixel, touching nuclei split, specks under 64 px dropped.
CLEAN = ["loss.pseudo_label_overlaps=exclusive", "loss.pseudo_label_split=true", "loss.pseudo_label_min_area=64"]
CLEANED = ("noadapt", "table1", "fraction")  # the variants that take a ``_clean`` suffix


def base_variant(variant: str) -> str:
    """The variant whose stages ``variant`` runs (``noadapt_clean`` runs ``noadapt``'s,
    ``fraction5_clean`` runs ``fraction5``'s)."""
    base = variant.removesuffix("_clean")
    return base if base != variant and base.startswith(CLEANED) else variant


def is_table(base: str) -> bool:
    """Whether a base variant runs all of CAST plus the supervised-only student (``run_all``)."""
    return base == "table1" or base.startswith("fraction")


def variant_overrides(variant: str) -> list[str]:
    return CLEAN if base_variant(variant) != variant else []


ABLATIONS = {
    "loss_sup": ["loss.lambda_semi=0", "loss.lambda_pxl=0"], "loss_semi": ["loss.lambda_pxl=0"],
    "loss_pxl": ["loss.lambda_semi=0"], "sampler_uniform": ["loss.sampler=uniform"],
    "sampler_mask": ["loss.sampler=mask"], "sampler_class": ["loss.sampler=class"],
}


def split_files(protocol: str, seed: int, fraction: float, out: Path, oracle: bool = False) -> dict[str, Path]:
    from castseg.demo import embedded_default
    from castseg.data.coco_io import load_coco, write_json
    from castseg.data.convert import convert
    from castseg.data.split import coco_subset, make_split, write_split

    if protocol == "domain":
        ann, split_seed = embedded_default(), seed  # the demo's protocol: split seed = run seed
    else:
        ann, split_seed = out / "dsb2018_all.json", 0  # one fixed split; seeds vary training only
        if not ann.is_file():
            if not DSB.is_dir():
                sys.exit(f"{DSB} not found: the dsb664 protocol needs ../shared/data beside the project")
            write_json(convert("mask-folders", DSB), ann)
    coco = load_coco(ann)
    folder = out / "splits" / f"{protocol}_s{split_seed}_{round(fraction * 100)}"
    split = make_split(coco, seed=split_seed, labeled_fraction=fraction, val_fraction=0.15)
    files = write_split(coco, split, folder, split_seed, fraction, 0.15)
    if oracle:  # its labeled set: every train image with its own labels (the split keeps them aside)
        files["labeled"] = folder / "labeled_oracle.json"
        write_json(coco_subset(coco, sorted(split.labeled + split.unlabeled), folder), files["labeled"])
    return files


def config(protocol: str, seed: int, fraction: float, extra: list[str], out: Path, oracle: bool = False):
    from castseg.demo import asset, standins
    from castseg.config import load_config, with_values
    from castseg.engine.distributed import resolve_device

    files = split_files(protocol, seed, fraction, out, oracle)
    cfg = load_config(asset("demo.yaml"), [*PROTOCOL_OVERRIDES[protocol], f"train.seed={seed}", *extra])
    teacher, student = standins()
    spec = {"type": "checkpoint", "path": str(teacher)}
    if resolve_device(cfg.train.device).type == "cuda":  # pseudo-label where it trains (CPU runs: as before)
        spec["device"] = "cuda"
    return with_values(cfg, {**{f"data.{k}": str(files[k].resolve()) for k in ("labeled", "unlabeled", "val",
                                                                             "unlabeled_gt") if k in files},
                             "teacher": spec,
                             "model.init_from": str(student)}, "dsb_protocol")


def adapted_teacher(protocol: str, seed: int, out: Path, extra: list[str] = ()) -> str:
    """``table1``'s adapted teacher (same seed and settings), so ablations change only the student.
    Only stage 1 runs when ``table1`` has not got that far (``table1`` later resumes from it), so
    an ablation can run beside an unfinished ``table1``."""
    from castseg import stages

    run_dir = out / protocol / f"table1_s{seed}"
    done = run_dir / "metrics.json"
    if done.is_file():
        ckpt = (json.loads(done.read_text()).get("teacher_adapted") or {}).get("checkpoint")
        if ckpt and Path(ckpt).is_dir():
            return ckpt
    cfg = config(protocol, seed, 0.1, list(extra), out)
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(stages.run_adapt(cfg, run_dir)[0].resolve())


def perfect_cache(cfg, out: Path) -> Path:
    """The unlabeled images' own labels (``data.unlabeled_gt``) as a pseudo-label cache (score 1),
    through the same import as ``castseg pseudo-label --predictions``."""
    from castseg.pseudo_labels import import_pseudo_labels

    import_pseudo_labels(cfg.data.unlabeled_gt, cfg.data.unlabeled, out, images_root=cfg.data.images_root)
    return out


def stage2_only(variant: str, cfg, protocol: str, seed: int, out: Path, run_dir: Path, extra: list[str]) -> dict:
    """Stage 2 alone: from ``table1``'s adapted teacher (ablations, ``distill``) or from the
    unlabeled images' own labels (``perfect_cache``)."""
    from castseg import stages

    if variant != "perfect_cache":
        return stages.run_distill(cfg, run_dir, adapted_teacher(protocol, seed, out, extra))[1]
    cache = perfect_cache(cfg, run_dir / "pseudo_labels" / "unlabeled_gt.json")
    return stages.distill_from_cache(cfg, run_dir, cache)[1]


def supervised_only(cfg, run_dir: Path) -> dict:
    """The supervised-only student from θ_s⁰ with the ``supervised`` budget."""
    from castseg import stages

    return stages.run_refine(cfg, run_dir, stages.initial_student(cfg), key="student_supervised", name="supervised")


def variant_config(protocol: str, variant: str, seed: int, out: Path, extra: list[str]):
    """The resolved config of one variant and seed: the one place both ``run_variant`` and
    ``supervised_side`` build it, so a side process trains with exactly the run's settings."""
    base = base_variant(variant)
    fraction = int(base[len("fraction"):]) / 100 if base.startswith("fraction") else 0.1
    return config(protocol, seed, fraction, [*extra, *ABLATIONS.get(variant, []), *variant_overrides(variant)],
                  out, oracle=variant == "oracle")


def supervised_side(protocol: str, variant: str, seed: int, out: Path, extra: list[str] = ()) -> dict:
    """Only the supervised-only stage of a run, in its own run folder: started in a second process
    beside the run (another core or GPU), it finishes first and the run then reuses it (the
    Trainer compares settings and inputs). metrics.json stays the run's own to write."""
    base = base_variant(variant)
    if not (is_table(base) or base == "noadapt"):
        sys.exit(f"--supervised-only: variant {variant!r} has no supervised-only stage")
    run_dir = out / protocol / f"{variant}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return supervised_only(variant_config(protocol, variant, seed, out, list(extra)), run_dir)


def run_variant(protocol: str, variant: str, seed: int, out: Path, extra: list[str] = ()) -> dict:
    from castseg import stages
    from castseg.demo import classical_baseline
    from castseg.config import save_resolved
    from castseg.data.coco_io import write_json

    base = base_variant(variant)
    run_dir = out / protocol / f"{variant}_s{seed}"
    done = run_dir / "metrics.json"
    table = is_table(base)
    metrics = json.loads(done.read_text()) if done.is_file() else {}
    classical_missing = table and "classical_baseline" not in metrics  # also runs finished before the row existed
    # noadapt pairs with its own supervised-only row, like table1 (also runs finished before it had one)
    supervised_missing = base == "noadapt" and metrics.get("complete") and "student_supervised" not in metrics
    if metrics.get("complete") and not classical_missing and not supervised_missing:
        return metrics
    cfg = variant_config(protocol, variant, seed, out, list(extra))
    if not metrics.get("complete"):
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
        t0 = time.perf_counter()
        if table:
            metrics = stages.run_all(cfg, run_dir)
        elif base == "noadapt":
            metrics = {"teacher_zero_shot": stages.evaluate_checkpoint(cfg.teacher.path, cfg)}
            student, rows = stages.run_distill(cfg, run_dir, cfg.teacher.path)
            metrics.update(rows, **stages.run_refine(cfg, run_dir, student), **supervised_only(cfg, run_dir))
        elif variant == "supervised":  # the baseline alone, e.g. its learning curve with train.val_every
            metrics = supervised_only(cfg, run_dir)
        elif variant == "oracle":
            metrics = stages.run_refine(cfg, run_dir, stages.initial_student(cfg), key="student_oracle",
                                        name="supervised")
        elif variant in ABLATIONS or variant in ("distill", "perfect_cache"):
            metrics = stage2_only(variant, cfg, protocol, seed, out, run_dir, list(extra))
        else:
            sys.exit(f"unknown variant {variant!r}")
        metrics.update(complete=True, seconds=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads())
    if supervised_missing:
        metrics.update(supervised_only(cfg, run_dir))
    if classical_missing:  # the training-free reference, as in `castseg demo`
        metrics["classical_baseline"] = classical_baseline(Path(cfg.data.val), cfg.eval.max_dets)
    write_json(metrics, done, indent=1)
    return metrics


def efficiency(sizes: list[tuple[int, int]], repeats: int) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from castseg.bench import time_fn
    from castseg.demo import standins
    from castseg.models import load_checkpoint

    teacher, _ = load_checkpoint(standins()[0])
    student, _ = load_checkpoint(standins()[1])
    rows = []
    for h, w in sizes:
        x = torch.rand(1, 3, h, w)
        for name, net in (("teacher (lite_teacher stand-in)", teacher.eval()),
                          ("student (lite_student stand-in)", student.eval())):
            with FlopCounterMode(display=False) as fc:
                net(x)
            with torch.no_grad():
                t = time_fn(lambda: net(x), repeats=repeats)
            rows.append({"input": f"{h}x{w}", "model": name, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
                         "gflops": fc.get_total_flops() / 1e9, "median_ms": t["median_ms"],
                         "threads": torch.get_num_threads()})
    return rows


def _mean_sd(vals: list[float]) -> str:
    """COCO AP as a percentage (the paper's unit): mean ± sample sd over seeds, then each seed."""
    vals = [100 * v for v in vals]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return (f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} "
            f"({', '.join(f'{v:.2f}' for v in vals)})")


def _paired(diff: list[float]) -> str:
    """A paired difference over seeds: ``_mean_sd`` plus the standard error of its mean (sd/√n),
    the yardstick of the "> 2 standard errors" targets."""
    if len(diff) < 2:
        return _mean_sd(diff)
    return f"{_mean_sd(diff)}; standard error {100 * statistics.stdev(diff) / len(diff) ** 0.5:.2f}"


def _paired_row(seeds: dict[int, dict], a: str, b: str, label: str, min_seeds: int = 2) -> list[str]:
    """Row ``a`` minus row ``b`` within each seed. Seeds draw their own split (val too), so the
    spread of a row mixes split and training noise; a difference within a seed compares like with
    like."""
    paired = [m for m in seeds.values() if all((m.get(k) or {}).get("AP") is not None for k in (a, b))]
    if len(paired) < min_seeds:
        return []
    diff = {metric: [m[a][metric] - m[b][metric] for m in paired] for metric in ("AP", "AP50")}
    return [f"| {label} | {_paired(diff['AP'])} | {_paired(diff['AP50'])} |"]


def _extra_rows(runs: list[dict], variant: str) -> list[str]:
    """The pseudo-labels' AP on the unlabeled images and the premise ratio (CAST needs > 1)."""
    lines = []
    distiller = "θ_T⁰ (distill, no stage 1)" if base_variant(variant) == "noadapt" else "θ_T'' (distill)"
    for key, label in (("adapt_a", "pseudo-labels of θ_T' (stage 1b)"),
                       ("teacher", f"pseudo-labels of {distiller}")):
        got = [(m.get("pseudo_labels") or {}).get(key) for m in runs]
        if got and all(got):
            lines.append(f"| {label}, vs the unlabeled images' own labels | {_mean_sd([g['AP'] for g in got])} | "
                         f"{_mean_sd([g['AP50'] for g in got])} |")
    ratios = [m.get("premise_ratio") for m in runs]
    if ratios and all(r is not None for r in ratios):
        lines.append(f"| premise: adapted teacher / supervised-only (×) | "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} | |")
    return lines


def _oracle_rows(seeds: dict[int, dict], runs: dict[str, dict[int, dict]]) -> list[str]:
    """Oracle − supervised-only (``table1``'s, else ``table1_clean``'s: the same student, seed and
    split; cleaning changes only the pseudo-labels): the most any teacher's pseudo-labels could
    add at this student budget."""
    def supervised(seed: int) -> dict | None:
        return next((runs[v][seed]["student_supervised"] for v in ("table1", "table1_clean")
                     if "student_supervised" in runs.get(v, {}).get(seed, {})), None)

    beside = {seed: {"student_oracle": m.get("student_oracle"), "student_supervised": supervised(seed)}
              for seed, m in sorted(seeds.items())}
    return _paired_row(beside, "student_oracle", "student_supervised",
                       "oracle − supervised-only (table1, paired by seed)", min_seeds=1)


def render(out: Path) -> str:
    lines = []
    for protocol in ("domain", "dsb664"):
        runs = {}
        for f in sorted((out / protocol).glob("*_s*/metrics.json")):
            m = json.loads(f.read_text())
            if m.get("complete"):
                variant, seed = f.parent.name.rsplit("_s", 1)
                runs.setdefault(variant, {})[int(seed)] = m
        if not runs:
            continue
        lines += [f"### protocol `{protocol}`", ""]
        for variant in sorted(runs):
            seeds = runs[variant]
            lines += [f"**{variant}** (seeds {sorted(seeds)}; minutes per run "
                      f"{', '.join(str(round(m['seconds'] / 60, 1)) for m in seeds.values())})", "",
                      "| model | mask AP (%) | AP50 (%) |", "|---|---|---|"]
            for key, label, _ in MODEL_ROWS:
                ap = [m[key]["AP"] for m in seeds.values() if (m.get(key) or {}).get("AP") is not None]
                ap50 = [m[key]["AP50"] for m in seeds.values() if (m.get(key) or {}).get("AP50") is not None]
                if ap:
                    lines.append(f"| {label} | {_mean_sd(ap)} | {_mean_sd(ap50)} |")
            for other, name in (("student_supervised", "supervised-only"), ("classical_baseline", "classical")):
                lines += _paired_row(seeds, "student_refined", other, f"refined − {name} (paired by seed)")
            lines += _extra_rows(list(seeds.values()), variant)
            lines += _oracle_rows(seeds, runs)
            lines.append("")
    eff = out / "efficiency.json"
    if eff.is_file():
        lines += ["### efficiency", "", "| input | model | params (M) | GFLOPs | median ms | threads |",
                  "|---|---|---|---|---|---|"]
        for r in json.loads(eff.read_text()):
            lines.append(f"| {r['input']} | {r['model']} | {r['params_M']:.2f} | {r['gflops']:.2f} | "
                         f"{r['median_ms']:.1f} | {r['threads']} |")
    return "\n".join(lines)


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=sorted(PROTOCOL_OVERRIDES), default="domain")
    ap.add_argument("--variants", nargs="*", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dsb_protocol")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="config overrides for every run (e.g. a smoke run: distill.train.max_steps=4)")
    ap.add_argument("--efficiency", action="store_true", help="params / GFLOPs / latency, teacher vs student")
    ap.add_argument("--render", action="store_true", help="print markdown tables of the finished runs")
    ap.add_argument("--supervised-only", action="store_true",
                    help="train only each run's supervised-only stage, in a second process beside the run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        for seed in args.seeds:
            if args.supervised_only:
                m = supervised_side(args.protocol, variant, seed, args.out, args.set)["student_supervised"]
                print(f"{args.protocol} {variant} seed {seed}: supervised-only {m['AP']:.3f}", flush=True)
                continue
            m = run_variant(args.protocol, variant, seed, args.out, args.set)
            print(f"{args.protocol} {variant} seed {seed}: " + ", ".join(
                f"{k} {m[k]['AP']:.3f}" for k, _, _ in MODEL_ROWS if (m.get(k) or {}).get("AP") is not None),
                flush=True)
    if args.efficiency:
        rows = efficiency([(256, 320), (512, 512)], repeats=10)
        (args.out / "efficiency.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.render:
        print(render(args.out))


if __name__ == "__main__":
    try:
        main()
    except CastsegError as e:  # e.g. a run folder holding stages trained with other settings: one line, no traceback
        print(f"dsb_protocol: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
