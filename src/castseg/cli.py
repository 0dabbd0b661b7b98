"""``castseg`` command line: one verb per stage of the data flow.

Each verb lives in :mod:`castseg.commands` as a module with ``add_parser(subparsers)`` (which
sets ``func``). User-fixable problems raise :class:`castseg.errors.CastsegError` and are printed
here as one line with exit code 2 — never a traceback.

Output: what a command was asked for (metrics, tables, ``--json``) goes to stdout; messages and
progress go to stderr through :mod:`logging` (:mod:`castseg.console`), which ``--quiet`` cuts
to warnings and ``--verbose`` extends to debug messages. Both may also follow the verb.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from castseg import __version__, console
from castseg.errors import CastsegError

logger = logging.getLogger("castseg.cli")  # also when run as `python -m castseg.cli`

# Imported lazily so `castseg --help` stays fast and one verb's heavy imports never slow another.
# Module names under castseg.commands; each module's add_parser names its verb (pseudo_label → pseudo-label).
COMMANDS = ["convert", "split", "eval", "predict", "pseudo_label", "pipeline", "export", "bench", "info", "plan", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="castseg",
        description="CAST: semi-supervised distillation of foundation-model teachers into compact "
        "instance-segmentation students.",
    )
    parser.add_argument("--version", action="version", version=f"castseg {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr (no progress)")
    loud.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"castseg.commands.{name}").add_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # --quiet / --verbose after the verb: the verb's parser leaves them to us
    for flag, names in (("quiet", ("-q", "--quiet")), ("verbose", ("-v", "--verbose"))):
        if any(e in names for e in extra):
            setattr(args, flag, True)
            extra = [e for e in extra if e not in names]
    if args.quiet and args.verbose:
        parser.error("argument -v/--verbose: not allowed with argument -q/--quiet")
    if extra:
        # `key=value` overrides may also follow the options (`castseg run cfg.yaml --name x train.lr=1e-4`).
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = logging.getLogger(console.ROOT)
    level = root.level
    # the library alone logs nowhere (a NullHandler); the command shows its messages on stderr
    installed = console.install()
    console.set_verbosity(quiet=args.quiet, verbose=args.verbose)
    logger.debug(f"castseg {__version__}: {args.command} {({k: v for k, v in vars(args).items() if k != 'func'})}")
    succeeded = False
    try:
        rc = int(args.func(args) or 0)
        succeeded = rc == 0
        return rc
    except CastsegError as e:
        print(f"castseg {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"castseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `castseg info ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    finally:
        _leave_process_group(synchronize=succeeded)
        # in-process callers (tests, notebooks) keep their logging set-up: level, handlers, propagation
        root.setLevel(level)
        if installed:
            console.uninstall()


def _leave_process_group(synchronize: bool) -> None:
    if "torch.distributed" in sys.modules:  # not imported: no command joined a process group
        from castseg.engine.distributed import cleanup_distributed

        cleanup_distributed(synchronize)


if __name__ == "__main__":
    raise SystemExit(main())
