"""The demo's library side: CAST end to end on the embedded default dataset (``castseg demo``).

:func:`run_demo` splits the dataset shipped in the package (107 colour H&E DSB2018 images: fixed
val, ``labeled_fraction`` of the rest labeled, the others unlabeled), runs the three CAST stages
plus the supervised-only student (:func:`castseg.stages.run_all`) from the pretrained stand-ins in
``assets/standins`` (or, ``pretrained=True``, the paper's hub models), adds the classical
reference row and returns the metrics and the results table. It logs its steps (``castseg``
logger) and prints nothing; ``castseg demo`` (:mod:`castseg.commands.demo`) prints the table.

Also here, for benchmarks and tests: the packaged assets (:func:`asset`, :func:`embedded_default`,
:func:`standins`), the demo's config (:func:`demo_config`), :func:`results_table` and
:func:`classical_baseline`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from castseg.errors import CastsegError
from castseg.model_rows import MODEL_ROWS

logger = logging.getLogger(__name__)

# The paper's models for `pretrained=True` (hub ids; a connected machine, ideally with a GPU).
PRETRAINED_TEACHER = {"type": "grounded_sam", "detector": "IDEA-Research/grounding-dino-base",
                      "segmenter": "facebook/sam2.1-hiera-large", "class_names": ["nucleus"],
                      "box_threshold": 0.3, "text_threshold": 0.25, "max_detections": 300}
PRETRAINED_STUDENT = {"preset": "small", "encoder_name": "facebook/dinov2-small", "pretrained": True}


def asset(*parts: str) -> Path:
    return Path(str(resources.files("castseg").joinpath("assets", *parts)))


def embedded_default() -> Path:
    """Annotation file of the dataset shipped inside the package."""
    path = asset("dsb2018_histology", "annotations.json")
    if not path.exists():
        raise CastsegError(f"the embedded default dataset is missing ({path}); reinstall castseg")
    return path


def standins() -> tuple[Path, Path]:
    """(stand-in teacher checkpoint, stand-in student checkpoint = θ_s⁰)."""
    teacher, student = asset("standins", "teacher"), asset("standins", "student")
    for p in (teacher / "model.safetensors", student / "model.safetensors"):
        if not p.is_file():
            raise CastsegError(f"pretrained stand-in missing ({p}); reinstall castseg or rebuild it with "
                               f"tools/train_standins.py")
    return teacher, student


def check_hub(ids: list[str]) -> None:
    """Fail fast, before any training, when a hub model is neither cached nor downloadable."""
    from huggingface_hub import hf_hub_download

    for repo in ids:
        try:
            hf_hub_download(repo, "config.json")
        except Exception as e:  # offline, no network, unknown repo, gated: all end here
            raise CastsegError(f"--pretrained needs {repo} from the Hugging Face hub, which is unreachable here "
                               f"({type(e).__name__}). Connect to the network (HF_HUB_OFFLINE unset) or fill "
                               f"the cache with `huggingface-cli download {repo}`; without it, run the demo "
                               f"without --pretrained (stand-ins)") from None


def _subset(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` images of the split file ``src`` (with annotations where it has them)."""
    from castseg.data.coco_io import load_coco, read_json, write_json
    from castseg.data.split import coco_subset

    with_annotations = "annotations" in read_json(src)  # unlabeled.json has none
    coco = load_coco(src, require_annotations=with_annotations)
    write_json(coco_subset(coco, [img["id"] for img in coco.images[:n]], dst.parent, with_annotations), dst)
    return dst


def demo_config(files: dict[str, Path], out: Path, *, overrides: Sequence[str] = (), seed: int = 0,
                quick: bool = False, pretrained: bool = False) -> Any:
    """assets/demo.yaml + the split's ``files`` + the models (stand-ins, or the hub's with
    ``pretrained``) + the dotted ``key=value`` ``overrides``; ``quick``: a few steps per stage on
    6 unlabeled and 4 val images (subsets written under ``out/splits``)."""
    from castseg.config import load_config, parse_scalar, with_values

    quick_values = ["adapt.train.max_steps=2", "distill.train.max_steps=4", "refine.train.max_steps=2",
                    "supervised.train.max_steps=2",
                    "train.ckpt_every=0", "train.log_every=1", "eval.topk=100"] if quick else []
    # overrides of the sections filled in below (model, teacher) are applied on top of them, last
    filled = [o for o in overrides if o.partition("=")[0].strip().split(".")[0] in ("model", "teacher")]
    cfg = load_config(asset("demo.yaml"), [*quick_values, f"train.seed={seed}",
                                           *(o for o in overrides if o not in filled)])
    labeled, unlabeled, val, gt = files["labeled"], files["unlabeled"], files["val"], files.get("unlabeled_gt")
    if quick:
        unlabeled = _subset(unlabeled, out / "splits" / "unlabeled_quick.json", 6)
        gt = _subset(gt, out / "splits" / "unlabeled_gt_quick.json", 6) if gt else None  # the same 6 images
        val = _subset(val, out / "splits" / "val_quick.json", 4)
    values: dict[str, Any] = {"data.labeled": str(labeled.resolve()), "data.unlabeled": str(unlabeled.resolve()),
                              "data.val": str(val.resolve()), "data.unlabeled_gt": str(gt.resolve()) if gt else None}
    if pretrained:
        # whole sections: the demo's lite_student fields must not override the small preset's
        values.update({"teacher": dict(PRETRAINED_TEACHER), "model": dict(PRETRAINED_STUDENT), "train.device": "auto"})
    else:
        teacher, student = standins()
        values.update({"teacher": {"type": "checkpoint", "path": str(teacher)}, "model.init_from": str(student)})
    # the user's key=value overrides win over the sections filled in above (e.g. `--pretrained
    # model.dec_layers=6` used to be dropped when the whole model section was replaced)
    for item in filled:
        key, _, text = item.partition("=")
        values[key.strip()] = parse_scalar(text)
    return with_values(cfg, values, "castseg demo")


def _efficiency(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    eff = metrics.get("efficiency") or {}
    return {"teacher": eff.get("teacher (adapted)") or {}, "student": eff.get("student (refined)") or {}}


def results_table(metrics: dict[str, Any]) -> str:
    from castseg.run_checks import PSEUDO_LABEL_SOURCES, premise_text, quality_text

    eff = _efficiency(metrics)
    # COCO AP in percent, the paper's unit (0.42 reads better than 0.004)
    head = f"{'model':<26}{'AP (%)':>9}{'AP50 (%)':>10}{'params':>10}{'latency':>11}"
    lines = [head, "-" * len(head)]
    for key, label, network in MODEL_ROWS:
        row = metrics.get(key) or {}
        if row.get("AP") is None:
            continue
        e = eff[network] if network else {}
        params = "0" if network is None else f"{e['params'] / 1e6:.2f}M" if e.get("params") else "—"  # 0: classical
        lat = f"{e['latency_ms']:.0f} ms" if e.get("latency_ms") else "—"
        lines.append(f"{label:<26}{100 * row['AP']:>9.2f}{100 * row['AP50']:>10.2f}{params:>10}{lat:>11}")
    pseudo = metrics.get("pseudo_labels") or {}
    rows = [(stage, pseudo[key]) for key, stage in PSEUDO_LABEL_SOURCES.items() if key in pseudo]
    for stage, row in rows:
        lines.append(f"{'pseudo-labels ' + stage + ' *':<26}{100 * row['AP']:>9.2f}{100 * row['AP50']:>10.2f}"
                     f"{'—':>10}{'—':>11}")
    if rows:
        lines.append(f"* pseudo-labels on the {pseudo['num_images']} unlabeled images, scored against their own "
                     "annotations (kept aside, never trained on)")
        lines += [f"  {stage}: {quality_text(row['quality'])}" for stage, row in rows if row.get("quality")]
    lines.append(premise_text(metrics))
    from castseg.report import verdict_lines

    lines += verdict_lines(metrics)
    return "\n".join(lines)


def classical_baseline(val_json: Path, max_dets: int) -> dict[str, float]:
    """Training-free reference row: Otsu threshold + watershed on the val images."""
    import torch

    from castseg.baselines.classical import segment_nuclei
    from castseg.evaluate import evaluate_model, predictor_instances

    def predict(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for x in images:  # [3,H,W] in [0,1] from uint8 files: the round trip is exact
            masks, scores = segment_nuclei((x * 255).round().byte().permute(1, 2, 0).numpy())
            out.append({"masks": torch.as_tensor(masks, dtype=torch.bool).reshape(-1, *x.shape[-2:]),
                        "scores": torch.as_tensor(scores, dtype=torch.float32),
                        "labels": torch.zeros(len(scores), dtype=torch.int64)})
        return out

    stats = evaluate_model(predictor_instances(predict), val_json, max_dets=max_dets)
    return {"AP": stats["AP"], "AP50": stats["AP50"]}


def _step(i: int, n: int, text: str) -> None:
    logger.info(f"[{i}/{n}] {text}")


def run_demo(*, out: str | Path, pretrained: bool = False, overrides: Sequence[str] = (),
             data: str | Path | None = None, seed: int = 0, labeled_fraction: float = 0.1,
             val_fraction: float = 0.15, quick: bool = False) -> dict[str, Any]:
    """The demo into ``out``: split ``data`` (default: the embedded dataset), then CAST's stages
    and the supervised-only student from the stand-ins (``pretrained``: the paper's hub models,
    checked reachable before any work), then the classical reference row.

    ``overrides``: dotted ``key=value`` overrides of assets/demo.yaml. ``quick``: a smoke run (a few
    steps per stage, 6 unlabeled and 4 val images). Re-running into the same ``out`` reuses every
    stage whose settings match and redoes the others (an earlier stage folder with other settings
    is kept as ``<stage>.stale-<n>``).

    Returns ``{"out", "config"`` (the resolved :class:`castseg.config.RunConfig`, also in
    ``out/config.yaml``), ``"metrics"`` (as in ``out/metrics.json``), ``"table"``
    (:func:`results_table`), ``"val_images"``, ``"report"`` (``out/report.html``) and
    ``"checkpoint"`` (the recommended student's copy in ``out/deploy/model``; else the refined
    student's, or None)``}``.
    """
    from castseg import stages
    from castseg.config import save_resolved
    from castseg.data.coco_io import load_coco, write_json
    from castseg.data.split import make_split, write_split

    t0 = time.perf_counter()
    out = Path(out)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)  # one "key=value" is fine too
    ann = Path(data) if data else embedded_default()
    n = 4
    if pretrained:
        check_hub([PRETRAINED_TEACHER["detector"], PRETRAINED_TEACHER["segmenter"],
                   PRETRAINED_STUDENT["encoder_name"]])
    _step(1, n, f"data: {ann}")
    coco = load_coco(ann)
    logger.info(f"      {len(coco.images)} images, {len(coco.annotations)} instances, classes {coco.class_names}")
    _step(2, n, f"split: val {val_fraction:.0%}, labeled {labeled_fraction:.0%} of the rest, seed {seed}")
    split = make_split(coco, seed=seed, labeled_fraction=labeled_fraction, val_fraction=val_fraction)
    files = write_split(coco, split, out / "splits", seed, labeled_fraction, val_fraction)
    logger.info(f"      labeled {len(split.labeled)}, unlabeled {len(split.unlabeled)}, val {len(split.val)} "
                f"-> {out / 'splits'}")
    cfg = demo_config(files, out, overrides=overrides, seed=seed, quick=quick, pretrained=pretrained)
    save_resolved(cfg, out / "config.yaml")
    models = "hub models (--pretrained)" if pretrained else "pretrained stand-ins (assets/standins)"
    _step(3, n, f"castseg run: adapt teacher -> distill -> refine (+ supervised-only student) from {models}; "
                f"config {out / 'config.yaml'}")
    # "auto": stages trained earlier in this folder with other settings are set aside and redone
    metrics = stages.run_all(cfg, out, resume="auto")
    _step(4, n, "classical reference on val (Otsu + watershed, no training)")
    metrics["classical_baseline"] = classical_baseline(Path(cfg.data.val), cfg.eval.max_dets)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    rec = metrics.pop("recommendation", None)
    metrics["recommendation"] = rec  # metrics.json ends with it, like the table and the report
    write_json(metrics, out / "metrics.json", indent=1)
    return {"out": out, "config": cfg, "metrics": metrics, "table": results_table(metrics),
            "val_images": len(load_coco(cfg.data.val).images), "report": out / "report.html",
            "checkpoint": ((rec or {}).get("files") or {}).get("checkpoint")
            or (metrics.get("student_refined") or {}).get("checkpoint")}
