"""``castseg export``: a student checkpoint → ONNX, with an onnxruntime parity check."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a student checkpoint to ONNX (parity-checked)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--height", type=int, default=512, help="trace/check height (default 512)")
    p.add_argument("--width", type=int, default=512, help="trace/check width (default 512)")
    p.add_argument("--fixed-size", action="store_true", help="fix H and W to --height/--width (batch stays dynamic)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |Δ| of mask probabilities (default 1e-3)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from castseg.api import load

    load(args.checkpoint, device="cpu").export(args.out, format=args.format, height=args.height, width=args.width,
                                               dynamic_size=not args.fixed_size, opset=args.opset,
                                               tolerance=args.tolerance)
    return 0
