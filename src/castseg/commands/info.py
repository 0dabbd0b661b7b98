"""``castseg info``: versions, devices, model sizes, and what a checkpoint holds."""

from __future__ import annotations

import argparse
import json
import platform


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="versions, devices, model sizes (paper teacher vs student)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="also describe this castseg checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
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
        from castseg.models.checkpoint import load_checkpoint
        from castseg.models.student import count_parameters

        model, meta = load_checkpoint(args.checkpoint)
        info["checkpoint"] = {"path": args.checkpoint, "params": count_parameters(model),
                              **{k: meta[k] for k in ("class_names", "step") if k in meta}}
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
