"""``castseg info [MODEL_OR_CKPT]``: versions, devices, model sizes, and what one forward costs.

Without a model: versions, devices and every preset's / the paper teacher's parameter count.
With one (a student preset, a named teacher such as ``teacher-gdino-sam2-paper``, or a castseg
checkpoint): its parameters and the GFLOPs of one forward at ``--size``, counted on the meta
device (no weights, no download; see :mod:`castseg.models.sizes` for what is counted).
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or ``"N"`` for a square) → ``(H, W)``."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else map(int, parts)
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 512x512 or 1024x2048; got {text!r}")
    return h, w


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="versions, devices, model sizes; params and GFLOPs of one model",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_CKPT",
                   help="a student preset (tiny, small, lite_student, ...), teacher-gdino-sam2-paper / "
                   "teacher-gdino-sam2-base, or a castseg checkpoint: report its params and GFLOPs")
    p.add_argument("--size", type=parse_size, default=(512, 512), metavar="HxW",
                   help="input size of the counted forward (default 512x512; the paper's Cityscapes: 1024x2048)")
    p.add_argument("--checkpoint", default=None, help="also describe this castseg checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def format_model(info: dict[str, Any]) -> str:
    """The human table of :func:`castseg.models.sizes.describe_model`'s dict."""
    h, w = info["size"]
    lines = [f"{info['model']} ({info['kind']}): {info['params'] / 1e6:.2f}M params, "
             f"{info['gflops']:.1f} GFLOPs for one {h}x{w} image"]
    if "class_names" in info:
        lines.append(f"classes {info['class_names']}, step {info['step']}")
    if info.get("components"):
        rows = [(c["part"], f"{c['params'] / 1e6:.2f}M", f"{c['gflops']:.1f}", c["input"]) for c in info["components"]]
        rows = [("part", "params", "GFLOPs", "input"), *rows, ("total", f"{info['params'] / 1e6:.2f}M",
                                                               f"{info['gflops']:.1f}", "")]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  ".join(v.ljust(n) if i in (0, 3) else v.rjust(n) for i, (v, n) in enumerate(zip(r, widths))
                            ).rstrip() for r in rows]
    lines.append(f"counted: {info['counted']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        from castseg.api import describe
        from castseg.errors import CastsegError

        if args.checkpoint:
            raise CastsegError("give the checkpoint either as MODEL_OR_CKPT or with --checkpoint, not both")
        info = describe(args.model, size=args.size)
        print(json.dumps(info) if args.json else format_model(info))
        return 0
    import torch
    import transformers

    from castseg import __version__
    from castseg.models.sizes import student_parameter_counts, teacher_parameter_counts

    students = student_parameter_counts()
    teachers = teacher_parameter_counts()
    paper_teacher = teachers["grounding-dino-large"] + teachers["sam2.1-hiera-large"]
    info = {
        "castseg": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(),
        "student_params": students, "teacher_params": teachers,
        "paper_teacher": "grounding-dino-large + sam2.1-hiera-large", "paper_teacher_params": paper_teacher,
        "teacher_student_ratio": paper_teacher / students["small"],
    }
    if args.checkpoint:
        from castseg.api import load

        model = load(args.checkpoint, device="cpu").info()
        info["checkpoint"] = {"path": args.checkpoint, "params": model["params"],
                              "class_names": model["class_names"], "step": model.get("step")}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"castseg {__version__} | python {info['python']} | torch {info['torch']} | "
          f"transformers {info['transformers']} | cuda {info['cuda']} | {info['threads']} threads")
    print("student presets: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in students.items())
          + "  (paper's student: small, 52M)")
    print("teacher parts:   " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in teachers.items()))
    print(f"paper teacher ({info['paper_teacher']}): {paper_teacher / 1e6:.1f}M params (paper: 568M); "
          f"teacher/student ratio {info['teacher_student_ratio']:.1f}x (paper: ~11x)")
    if "checkpoint" in info:
        c = info["checkpoint"]
        print(f"checkpoint {c['path']}: {c['params'] / 1e6:.2f}M params, classes {c.get('class_names')}, "
              f"step {c.get('step')}")
    return 0
