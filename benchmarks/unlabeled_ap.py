"""How well do a protocol run's students already know its unlabeled images? (not a test)

Scores θ_s⁰ (the student every arm starts from), the supervised-only and the refined student of
one ``dsb_protocol.py`` run folder on the unlabeled images' own labels (``data.unlabeled_gt``,
kept aside by the split), with the run's val settings; θ_s⁰ on the val images too. Where θ_s⁰
already scores above the teacher's pseudo-labels on those images (their AP is in the run's
``metrics.json``), distillation can only replace what the student knew with something worse:
the leak a protocol has when the stand-ins were trained on its unlabeled images.

    python benchmarks/unlabeled_ap.py --run runs/curves/dsb664/table1_clean_s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from castseg import stages
from castseg.commands.demo import standins
from castseg.config import load_config, with_values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished dsb_protocol.py run folder")
    args = ap.parse_args()
    done = args.run / "metrics.json"
    metrics = json.loads(done.read_text()) if done.is_file() else {}
    missing = [k for k in ("student_supervised", "student_refined") if not (metrics.get(k) or {}).get("checkpoint")]
    if missing:
        raise SystemExit(f"{done}: lacks {', '.join(missing)} (run the variant to its end first)")
    cfg = load_config(args.run / "config.yaml")
    if not cfg.data.unlabeled_gt:
        raise SystemExit(f"{args.run / 'config.yaml'}: data.unlabeled_gt is not set (the split keeps it aside)")
    on_unlabeled = with_values(cfg, {"data.val": cfg.data.unlabeled_gt}, "unlabeled_ap")
    rows = {"θ_s⁰": str(standins()[1]), "supervised-only": metrics["student_supervised"]["checkpoint"],
            "refined": metrics["student_refined"]["checkpoint"]}
    out = {}
    print("| student | AP on the unlabeled images (%) | AP50 (%) | AP on val (%) |\n|---|---|---|---|")
    for name, ckpt in rows.items():
        unl = stages.evaluate_checkpoint(ckpt, on_unlabeled)
        val = stages.evaluate_checkpoint(ckpt, cfg) if name == "θ_s⁰" else metrics[
            "student_supervised" if name == "supervised-only" else "student_refined"]
        out[name] = {"unlabeled": {k: unl[k] for k in ("AP", "AP50")}, "val": {k: val[k] for k in ("AP", "AP50")}}
        print(f"| {name} | {100 * unl['AP']:.2f} | {100 * unl['AP50']:.2f} | {100 * val['AP']:.2f} |", flush=True)
    (args.run / "unlabeled_ap.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
