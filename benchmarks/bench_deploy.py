"""Deployment latency: the paper-configured teacher vs the `small` student, torch vs onnxruntime.

    python benchmarks/bench_deploy.py [--size 512] [--repeats 3] [--teacher-repeats 2] [--threads N]

Both models get the same 1×3×S×S image. Teacher = Grounding DINO (Swin-L) + SAM2.1-L built from
their public configs with random weights (latency does not depend on weight values; nothing is
downloaded), detector input = the image size (the real processor would upscale to 800 px, so
this favours the teacher), 100 boxes prompted to SAM2. Student = the paper's `small` preset
(DINOv2-S + DPT + 9-layer decoder, 100 queries), timed in torch eager and, exported by
castseg's own exporter, in onnxruntime. Prints ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from castseg.bench import bench_predictor_forward
from castseg.models import StudentConfig, build_student, count_parameters, save_checkpoint
from castseg.models.grounded_sam import GroundedSAMTeacher
from castseg.models.sizes import paper_teacher_configs
from castseg.models.tiny_teacher import save_tiny_tokenizer


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--teacher-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.size
    x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        student = build_student(StudentConfig.from_preset("small", pretrained=False)).eval()
        n_student = count_parameters(student)
        rows["student (small) / torch"] = bench_predictor_forward(lambda t: student(t), x, args.repeats)
        from castseg.export import export_onnx
        from castseg.models.onnx_network import OnnxNetwork

        export_onnx(student, ["nucleus"], Path(tmp) / "s.onnx", s, s)
        onnx_net = OnnxNetwork(Path(tmp) / "s.onnx", threads=torch.get_num_threads())
        rows["student (small) / onnxruntime"] = bench_predictor_forward(onnx_net, x, args.repeats)
        del student

        cfgs = paper_teacher_configs()
        tok = save_tiny_tokenizer(Path(tmp) / "tok", ["nucleus"])
        teacher = GroundedSAMTeacher(pretrained=False, detector_config=cfgs["grounding-dino-large"],
                                     segmenter_config=cfgs["sam2.1-hiera-large"], tokenizer=str(tok),
                                     detector_size=(s, s), box_threshold=0.0, text_threshold=0.0,
                                     max_detections=100, class_names=["nucleus"]).eval()
        n_teacher = count_parameters(teacher)
        rows["teacher (GDINO-L + SAM2.1-L) / torch"] = bench_predictor_forward(
            lambda t: teacher.predict(t, ["nucleus"]), x, args.teacher_repeats)
    base = rows["student (small) / torch"]["median_ms"]
    teacher_ms = rows["teacher (GDINO-L + SAM2.1-L) / torch"]["median_ms"]
    print(f"input 1x3x{s}x{s}, {torch.get_num_threads()} threads; student {n_student / 1e6:.1f}M params, "
          f"teacher {n_teacher / 1e6:.1f}M params")
    print("| model / runtime | median ms | images/s | peak MB | teacher ms / this |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        peak = "—" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        print(f"| {name} | {r['median_ms']:.0f} | {r['images_per_s']:.2f} | {peak} | {teacher_ms / r['median_ms']:.2f} |")
    print(f"student torch is {teacher_ms / base:.2f}x faster than the teacher (paper, GPU: 4.56x)")


if __name__ == "__main__":
    main()
