"""``castseg plan CONFIG [key=value ...] [--json]``: will this run fit on my GPU?

Per stage of ``castseg run`` (adapt/a, adapt/c, the pseudo-label pass, distill, refine,
supervised): parameters, GFLOPs per training step and the estimated peak memory per GPU process
(weights + gradients + AdamW state + activations at the config's crop, batch and amp), plus the
data loader's decode cost per step. Models are built on the meta device: no weights, no data,
no download (see :mod:`castseg.plan` for what is counted and what is approximated).
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="per-stage params, GFLOPs/step and peak GPU memory of a run config",
                              description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1])
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=2")
    p.add_argument("--no-data", action="store_true", help="do not time the data loader even if the data exist")
    p.add_argument("--json", action="store_true", help="print one JSON object (memory in bytes)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from castseg.api import plan as plan_run
    from castseg.plan import format_plan

    plan = plan_run(args.config, *args.overrides, measure_data=not args.no_data)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0
