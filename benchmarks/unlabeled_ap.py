"""How well do a protocol run's students already know its unlabeled images? (not a test)

Counts the run's labeled / unlabeled / val images that the stand-ins were trained on (the file
names in their ``recipe.json``), then scores θ_s⁰ (the student every arm starts from), the
supervised-only and the refined student of one ``dsb_protocol.py`` run folder on the unlabeled
images' own labels (``data.unlabeled_gt``, kept aside by the split), with the run's val
settings; θ_s⁰ on the val images too. Where θ_s⁰ already scores above the teacher's
pseudo-labels on those images (their AP is in the run's ``metrics.json``), distillation can only
replace what the student knew with something worse: the leak a protocol has when the stand-ins
were trained on its unlabeled images.

    python benchmarks/unlabeled_ap.py --run runs/curves/dsb664/table1_clean_s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from castseg import stages
from castseg.demo import asset, standins
from castseg.config import load_config, with_values
from castseg.data.coco_io import load_coco

# row → its metrics.json key; θ_s⁰ has none (it is the stand-in itself, scored here on val too)
ROWS = {"θ_s⁰": None, "supervised-only": "student_supervised", "refined": "student_refined"}


def seen_by_standins(cfg) -> str:
    """``part: seen/all`` for the run's image sets: how many the stand-ins were trained on."""
    seen = set(json.loads(asset("standins", "recipe.json").read_text())["source"]["file_names"])
    parts = {"labeled": cfg.data.labeled, "unlabeled": cfg.data.unlabeled, "val": cfg.data.val}
    counts = []
    for part, path in parts.items():
        names = [im["file_name"] for im in load_coco(path, cfg.data.images_root, require_annotations=False).images]
        counts.append(f"{part} {sum(n in seen for n in names)}/{len(names)}")
    return ", ".join(counts)


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished dsb_protocol.py run folder")
    args = ap.parse_args()
    done = args.run / "metrics.json"
    metrics = json.loads(done.read_text()) if done.is_file() else {}
    missing = [k for k in ROWS.values() if k and not (metrics.get(k) or {}).get("checkpoint")]
    if missing:
        raise SystemExit(f"{done}: lacks {', '.join(missing)} (run the variant to its end first)")
    cfg = load_config(args.run / "config.yaml")
    if not cfg.data.unlabeled_gt:
        raise SystemExit(f"{args.run / 'config.yaml'}: data.unlabeled_gt is not set (the split keeps it aside)")
    print(f"images the stand-ins were trained on: {seen_by_standins(cfg)}\n")
    on_unlabeled = with_values(cfg, {"data.val": cfg.data.unlabeled_gt}, "unlabeled_ap")
    out = {}
    print("| student | AP on the unlabeled images (%) | AP50 (%) | AP on val (%) |\n|---|---|---|---|")
    for name, key in ROWS.items():
        ckpt = metrics[key]["checkpoint"] if key else str(standins()[1])
        unl = stages.evaluate_checkpoint(ckpt, on_unlabeled)
        val = metrics[key] if key else stages.evaluate_checkpoint(ckpt, cfg)
        out[name] = {"unlabeled": {k: unl[k] for k in ("AP", "AP50")}, "val": {k: val[k] for k in ("AP", "AP50")}}
        print(f"| {name} | {100 * unl['AP']:.2f} | {100 * unl['AP50']:.2f} | {100 * val['AP']:.2f} |", flush=True)
    (args.run / "unlabeled_ap.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
