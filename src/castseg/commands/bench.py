"""``castseg bench``: latency of a student (torch eager, torch.compile, onnxruntime) and of a
teacher at the same input, printed as ratios."""

from __future__ import annotations

import argparse
import json

from castseg.commands.info import parse_size


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="latency / throughput / memory of student vs teacher per runtime",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="student checkpoint")
    p.add_argument("--onnx", default=None, help="the student exported by `castseg export`")
    p.add_argument("--teacher", default=None, help="teacher folder (teacher.json) or checkpoint to compare")
    p.add_argument("--size", type=parse_size, default=(512, 512), help="HxW input (default 512x512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from castseg.api import load
    from castseg.bench import bench_predictor_forward
    from castseg.errors import CastsegError

    h, w = args.size
    x = torch.rand(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(args.device)
    student = load(args.checkpoint, device=args.device)
    if student.kind != "student":
        raise CastsegError(f"{args.checkpoint}: --checkpoint must be a student checkpoint (teachers go in --teacher)")
    # Runtimes differ in the network, so a student-architecture model is timed without post-processing.
    network = student.network.model
    rows: dict[str, dict] = {}
    rows["student/torch"] = bench_predictor_forward(network, x, args.repeats, args.device)
    if not args.no_compile:
        try:
            compiled = torch.compile(network)
            rows["student/torch.compile"] = bench_predictor_forward(lambda t: compiled(t), x, args.repeats,
                                                                    args.device)
        except Exception as e:  # no compiler toolchain, unsupported op...: report, don't fail
            rows["student/torch.compile"] = {"median_ms": None, "error": str(e).splitlines()[0][:160]}
    if args.onnx:
        rows["student/onnxruntime"] = bench_predictor_forward(load(args.onnx).network.model, x.cpu(), args.repeats)
    if args.teacher:
        teacher = load(args.teacher, device=args.device)
        # A student-architecture teacher is timed like the student (network only); a composite
        # teacher's forward is its whole detect → segment pipeline.
        fn = teacher if teacher.kind == "teacher" else teacher.network.model
        rows["teacher/torch"] = bench_predictor_forward(fn, x, args.repeats, args.device)
    base = rows["student/torch"]["median_ms"]
    for r in rows.values():
        if r.get("median_ms"):
            r["ratio_to_student_torch"] = r["median_ms"] / base
    result = {"size": [h, w], "batch": args.batch, "device": args.device, "threads": torch.get_num_threads(),
              "runtimes": rows, "median_ms": {k: v.get("median_ms") for k, v in rows.items()}}
    if "teacher/torch" in rows:
        result["teacher_over_student"] = rows["teacher/torch"]["median_ms"] / base
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"input {args.batch}x3x{h}x{w} on {args.device}, {result['threads']} threads, median of {args.repeats}")
    print("| runtime | median ms | images/s | peak MB | × student torch |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        if r.get("median_ms") is None:
            print(f"| {name} | unavailable: {r.get('error')} | | | |")
            continue
        peak = "—" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        print(f"| {name} | {r['median_ms']:.1f} | {r['images_per_s']:.2f} | {peak} | {r['ratio_to_student_torch']:.2f} |")
    if "teacher_over_student" in result:
        print(f"student is {result['teacher_over_student']:.2f}x faster than the teacher at this input")
    return 0
