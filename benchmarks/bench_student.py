"""Student forward latency on this machine, per preset, as a ratio to the `tiny` preset.

    python benchmarks/bench_student.py [--size 256] [--repeats 5] [--presets tiny small]

Absolute times drift on shared machines; the ratio to `tiny`, measured in the same run, is the
number to compare. Random weights (latency does not depend on their values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from castseg.models.student import StudentConfig, build_student, count_parameters


def median_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)  # warm-up: allocator, lazy init
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    args = ap.parse_args()
    x = torch.rand(1, 3, args.size, args.size)
    rows = []
    for name in args.presets:
        model = build_student(StudentConfig.from_preset(name, pretrained=False)).eval()
        rows.append((name, count_parameters(model) / 1e6, median_ms(model, x, args.repeats)))
    base = rows[0][2]
    print(f"input 1x3x{args.size}x{args.size}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| preset | params (M) | median ms | ratio to first |")
    print("|---|---|---|---|")
    for name, params, ms in rows:
        print(f"| {name} | {params:.2f} | {ms:.0f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
