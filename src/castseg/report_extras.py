"""What the run report shows besides the metrics: each model's size, cost and predictions.

:func:`report_extras` loads the adapted teacher and the refined student through the one
loader (:func:`castseg.load`) and measures params, GFLOPs
and latency on the first val image, then draws both models' predictions on the first val
images, teacher and student of one image side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from castseg.config import RunConfig

MODELS = (("teacher_adapted", "teacher (adapted)"), ("student_refined", "student (refined)"))


def report_extras(cfg: RunConfig, metrics: dict[str, Any], num_images: int = 2, repeats: int = 3,
                  device: str = "cpu") -> tuple[dict[str, dict[str, Any]], list[tuple[str, bytes]]]:
    """``({label: {params, gflops, latency_ms, device}}, [(caption, PNG bytes), ...])``; the
    latency is measured on ``device`` (the run's: a GPU run reports GPU latencies)."""
    from castseg.bench import bench_predictor_forward
    from castseg.predictor import image_tensor
    from castseg.data.coco_io import load_coco
    from castseg.data.images import read_image
    from castseg.predictor import load
    from castseg.report import overlay

    if not cfg.data.val:
        return {}, []
    val = load_coco(cfg.data.val, cfg.data.images_root)
    images = [read_image(val.image_path(img)) for img in val.images[:num_images]]
    views = [image_tensor(img, cfg.val_max_size)[None] for img in images]
    efficiency: dict[str, dict[str, Any]] = {}
    panels: dict[int, list[tuple[str, bytes]]] = {}  # per val image: teacher's, then student's
    for key, label in MODELS:
        ckpt = (metrics.get(key) or {}).get("checkpoint")
        if not ckpt:
            continue
        model = load(ckpt, topk=cfg.eval.topk, device=device)
        efficiency[label] = {"params": model.num_parameters(), "gflops": model.gflops(views[0]),
                             "latency_ms": bench_predictor_forward(model, views[0], repeats, device)["median_ms"],
                             "device": device}
        for i, r in enumerate(model.predict(images, score_threshold=0.3, max_size=cfg.val_max_size)):
            panels.setdefault(i, []).append((f"val image {i + 1}: {label}", overlay(images[i], r.masks, label)))
    return efficiency, [p for i in sorted(panels) for p in panels[i]]
