#!/usr/bin/env python
"""Cost of L_pxl's debiased sampler (a reviewer noted the paper never reported it).

    python benchmarks/bench_pixel_contrastive.py [--repeats N] [--step-repeats N] [--no-step]
                                                 [--write-md BENCHMARKS.md]

Part 1, the loss alone: one L_pxl call (forward + backward) at B=2, D=128, embedding grids
64x128 and 128x256, K=100 queries, C+1 = 2 or 20 classes, mask logits [2,100,256,512] (stride 4
of a 1024x2048 image), defaults max_anchors=1024, max_pool=4096, R=200; every sampler mode
against ``uniform`` measured in the same run (machines are noisy: compare ratios).

Part 2, share of a distillation step: the ``tiny`` student on a 2x3x1024x2048 batch (embedding
stride 16 -> 64x128 grid, stride 8 -> 128x256): forward with embeddings on the weak view +
no-grad forward on the strong view + a set-loss-free dummy loss on the outputs + L_pxl, backward.
Share = the sampler's own time (``last_stats["sampler_ms"]``, timed inside that step) / step time.

Peak memory: resident-set high-water mark of the process (Linux /proc/self/status VmHWM, reset
through /proc/self/clear_refs before each measured call) minus the resident size just before
it, i.e. the extra memory the call touched at its peak. The script re-executes itself with
MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers go back to the OS at once and do not hide
later allocations (measured: a 76 MiB tensor pair reads as 78 MiB).
"""

from __future__ import annotations

import os
import sys

if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"   # must be set before the allocator starts
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from castseg.losses.pixel_contrastive import PixelContrastiveLoss, sample_negatives  # noqa: E402
from castseg.models.student import StudentConfig, build_student  # noqa: E402

SECTION = "## Pixel-contrastive sampler cost"
GRIDS = [(64, 128, 16), (128, 256, 8)]       # (He, We, student embed_stride at 1024x2048)
IMAGE = (1024, 2048)
NOTE = ("\"sampler ms\" is the loss's own `last_stats[\"sampler_ms\"]` (sampler features + s_deb weights + "
        "the draw; the uniform anchor/pool subsets are outside it); `uniform` also runs the draw over the "
        "[A, P] candidate matrix, so fused - uniform is the cost of the debiasing itself. Loss calls of all "
        "samplers are interleaved round-robin on the same inputs. Peak MiB = resident high-water mark "
        "(VmHWM, reset via /proc/self/clear_refs) minus resident size before the call, with "
        "MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave RSS at once. Step times vary by tens of "
        "percent between runs on this shared machine (\"step / uniform\" is noise at this scale); the "
        "sampler's share of a step is timed inside that step.")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class PeakRSS:
    """``with PeakRSS() as m: ...``; then ``m.mib`` = peak extra resident memory (MiB)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = _status_mib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")             # reset VmHWM to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc) -> None:
        self.mib = _status_mib("VmHWM") - self.base if self.ok else float("nan")


def loss_inputs(He: int, We: int, c1: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zw = torch.nn.functional.normalize(torch.randn(2, 128, He, We, generator=g), dim=1).requires_grad_(True)
    zs = torch.nn.functional.normalize(torch.randn(2, 128, He, We, generator=g), dim=1)
    masks = torch.randn(2, 100, IMAGE[0] // 4, IMAGE[1] // 4, generator=g) * 4
    cls = torch.randn(2, 100, c1, generator=g) * 4
    return zw, zs, masks, cls


def bench_loss(He: int, We: int, c1: int, samplers: tuple[str, ...], repeats: int) -> dict[str, dict]:
    """Every sampler on the same inputs, called round-robin (rotating the order each round) so
    that load changes on a shared machine hit all of them alike; medians over ``repeats``."""
    zw, zs, masks, cls = loss_inputs(He, We, c1)
    fns = {s: PixelContrastiveLoss(sampler=s, timed=True) for s in samplers}
    g = torch.Generator().manual_seed(1)
    res = {s: {"ms": [], "sampler_ms": []} for s in samplers}

    for s in samplers:                        # warm-up (first-call allocations, lazy init)
        fns[s](zw, zs, masks, cls, generator=g).backward()
    for i in range(repeats):
        for s in samplers[i % len(samplers):] + samplers[: i % len(samplers)]:
            zw.grad = None
            t = time.perf_counter()
            fns[s](zw, zs, masks, cls, generator=g).backward()
            res[s]["ms"].append((time.perf_counter() - t) * 1e3)
            res[s]["sampler_ms"].append(fns[s].last_stats["sampler_ms"])
    out = {}
    for s in samplers:
        zw.grad = None                        # freed outside the measurement: it would offset the peak
        with PeakRSS() as mem:
            fns[s](zw, zs, masks, cls, generator=g).backward()
        out[s] = {"ms": statistics.median(res[s]["ms"]), "sampler_ms": statistics.median(res[s]["sampler_ms"]),
                  "mib": mem.mib}
    return out


def bench_sampler_alone(repeats: int, A: int = 1024, P: int = 4096, feat: int = 120) -> tuple[float, float]:
    """sample_negatives alone (weights + Gumbel top-k), fused-width features vs uniform."""
    g = torch.Generator().manual_seed(0)
    ya = torch.nn.functional.normalize(torch.rand(A, feat, generator=g), dim=1)
    yp = torch.nn.functional.normalize(torch.rand(P, feat, generator=g), dim=1)
    out = []
    for uniform in (True, False):
        sample_negatives(ya, yp, 200, g, uniform=uniform)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            sample_negatives(ya, yp, 200, g, uniform=uniform)
            ts.append((time.perf_counter() - t) * 1e3)
        out.append(statistics.median(ts))
    return out[0], out[1]


def bench_step(model, sampler: str, repeats: int) -> dict:
    """One distillation step's L_pxl part with the student (no set loss: a dummy loss stands
    in for it so that every output is in the graph)."""
    g = torch.Generator().manual_seed(0)
    weak = torch.rand(2, 3, *IMAGE, generator=g)
    strong = (weak * 0.8 + 0.1).clamp(0, 1)       # photometric change only: same pixels
    fn = PixelContrastiveLoss(sampler=sampler, timed=True)
    res = {"ms": [], "sampler_ms": [], "mib": float("nan")}
    for i in range(repeats):
        model.zero_grad(set_to_none=True)
        with PeakRSS() as mem:
            t = time.perf_counter()
            out = model(weak, return_embeddings=True)
            with torch.no_grad():
                z_strong = model(strong, return_embeddings=True)["embeddings"]
            dummy = out["pred_logits"].float().mean() + out["pred_masks"].float().sigmoid().mean()
            loss = dummy + 0.1 * fn(out["embeddings"], z_strong, out["pred_masks"], out["pred_logits"], generator=g)
            loss.backward()
            res["ms"].append((time.perf_counter() - t) * 1e3)
        res["sampler_ms"].append(fn.last_stats["sampler_ms"])
        res["mib"] = mem.mib if i == 0 else max(res["mib"], mem.mib)
        del out, z_strong, loss, dummy
    return {"ms": statistics.median(res["ms"]), "sampler_ms": statistics.median(res["sampler_ms"]),
            "mib": res["mib"]}


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed loss calls per setting (median)")
    ap.add_argument("--step-repeats", type=int, default=1, help="timed student steps per setting (slow on CPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable on a shared machine; 0 keeps torch's default)")
    ap.add_argument("--no-step", action="store_true", help="skip part 2 (the student step)")
    ap.add_argument("--write-md", type=Path, default=None, help=f"replace/append the '{SECTION[3:]}' section")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cmd = "python benchmarks/bench_pixel_contrastive.py " + " ".join(sys.argv[1:])
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
           f"threads: {torch.get_num_threads()}; loss medians of {args.repeats} calls after 1 warm-up")
    lines = [SECTION, "", f"Command: `{cmd.strip()}` ({env}).", "", NOTE, "",
             "### L_pxl call (forward + backward), B=2, D=128, K=100, A=1024 anchors, pool 4096, R=200", "",
             ("| grid | C+1 | sampler | call ms | sampler ms | sampler share of call | peak MiB "
              "| call ms / uniform | peak / uniform |"), "|---|---|---|---|---|---|---|---|---|"]
    for He, We, _ in GRIDS:
        for c1 in (2, 20):
            results = bench_loss(He, We, c1, ("uniform", "mask", "class", "fused"), args.repeats)
            base = results["uniform"]
            for sampler, r in results.items():
                lines.append(f"| {He}x{We} | {c1} | {sampler} | {r['ms']:.1f} | {r['sampler_ms']:.1f} | "
                             f"{r['sampler_ms'] / r['ms']:.0%} | {r['mib']:.0f} | {r['ms'] / base['ms']:.2f} | "
                             f"{r['mib'] / max(base['mib'], 1e-9):.2f} |")
                print(lines[-1], flush=True)
    tu, tf = bench_sampler_alone(args.repeats * 4)
    lines += ["", (f"`sample_negatives` alone (1024 anchors x 4096 pool, R=200, 120-d features): "
                   f"uniform {tu:.1f} ms, s_deb-weighted {tf:.1f} ms ({tf / tu:.2f}x).")]
    print(lines[-1], flush=True)
    if not args.no_step:
        lines += ["", (f"### Share of a distillation step: `tiny` student, 2x3x{IMAGE[0]}x{IMAGE[1]}, C+1=20, "
                       f"weak fwd+bwd + strong no-grad fwd + L_pxl (median of {args.step_repeats})"), "",
                  "| grid | sampler | step ms | sampler ms | sampler share of step | peak MiB | step / uniform |",
                  "|---|---|---|---|---|---|---|"]
        for He, We, stride in GRIDS:
            model = build_student(StudentConfig.from_preset("tiny", num_classes=19, embed_stride=stride)).train()
            base = None
            for sampler in ("uniform", "fused"):
                r = bench_step(model, sampler, args.step_repeats)
                base = base or r
                lines.append(f"| {He}x{We} | {sampler} | {r['ms']:.0f} | {r['sampler_ms']:.1f} | "
                             f"{r['sampler_ms'] / r['ms']:.3%} | {r['mib']:.0f} | {r['ms'] / base['ms']:.3f} |")
                print(lines[-1], flush=True)
            del model
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.write_md is not None:
        old = args.write_md.read_text() if args.write_md.exists() else "# Benchmarks\n"
        pat = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
        new = pat.sub(lambda _: text + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + text
        args.write_md.write_text(new)


if __name__ == "__main__":
    main()
