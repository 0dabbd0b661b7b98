"""``castseg`` command line: one verb per stage of the data flow.

Each verb lives in :mod:`castseg.commands` as a module with ``add_parser(subparsers)`` (which
sets ``func``). User-fixable problems raise :class:`castseg.errors.CastsegError` and are printed
here as one line with exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from castseg import __version__
from castseg.errors import CastsegError

# Imported lazily so `castseg --help` stays fast and one verb's heavy imports never slow another.
# Module names under castseg.commands; each module's add_parser names its verb (pseudo_label → pseudo-label).
COMMANDS = ["convert", "split", "eval", "predict", "pseudo_label", "pipeline", "export", "bench", "info", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="castseg",
        description="CAST: semi-supervised distillation of foundation-model teachers into compact "
        "instance-segmentation students.",
    )
    parser.add_argument("--version", action="version", version=f"castseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"castseg.commands.{name}").add_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides may also follow the options (`castseg run cfg.yaml --name x train.lr=1e-4`).
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CastsegError as e:
        print(f"castseg {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"castseg {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    if "torch.distributed" in sys.modules:  # not imported: no command joined a process group
        from castseg.engine.distributed import cleanup_distributed

        cleanup_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
