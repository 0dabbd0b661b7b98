"""``castseg plan``: will a run config fit on my GPU? Parameters, GFLOPs per step and the peak
memory per GPU process of every stage, estimated before any data or weight is touched.

For each stage (adapt/a, adapt/c, the pseudo-label pass, distill, refine, supervised) the
stage's model is built on the meta device (students from their :class:`StudentConfig` with
``pretrained=False``; a checkpoint teacher from its ``model.json`` architecture; Grounding DINO +
SAM2 from the known paper configs of :func:`castseg.models.sizes.paper_teacher_configs` for
their hub ids, or a local folder's ``config.json``) and one step is replayed on meta tensors
(:mod:`castseg.plan_steps`: what is measured and what is approximated). Per stage:

- ``params`` / ``trainable_params``;
- ``gflops_per_step``: counted by ``FlopCounterMode`` over forward + backward of the replayed
  step at the stage's per-process batch (labeled batch, stacked with the unlabeled one where the
  stage reads it, as :mod:`castseg.objective` does) and the config's crop;
- ``memory`` (bytes): ``weights`` (parameters + buffers), ``gradients`` (one per trainable
  parameter, of its dtype), ``optimizer`` (AdamW: 2 fp32 tensors per trainable parameter),
  ``activations`` (peak of the replay's live tensors, gradients of parameters excepted; halved
  under ``train.amp`` bf16/fp16, whose autocast keeps activations in half precision) and
  ``total``: their sum — an upper bound of the peak, since parameter gradients only fill up
  while backward frees activations. Not counted: the CUDA context and allocator caching
  (typically 0.5-1 GiB more on a GPU), DataLoader worker processes.

``data``: images decoded per step of each stage; when the labeled json exists, the mean decode +
weak-view transform time of a few samples (:class:`~castseg.data.dataset.CocoInstanceDataset`),
in seconds per step for one worker.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from castseg.config import RunConfig
from castseg.errors import CastsegError

DEFAULT_INSTANCES = 20    # matched instances per image when the labeled json is not there to count
DATA_SAMPLES = 3          # samples decoded to time the data loader
GiB = 2 ** 30


# --------------------------------------------------------------------- models on the meta device


def meta_student(arch: dict[str, Any]) -> nn.Module:
    """A student-architecture model from a ``model:`` mapping, random, on the meta device."""
    from castseg.models.sizes import on_meta
    from castseg.models.student import StudentConfig, build_student

    with torch.device("meta"):
        return on_meta(build_student(StudentConfig.from_dict({**arch, "pretrained": False})))


def _hf_config(name: str | None, given: Any, default: str, cls: Any, option: str) -> Any:
    """A transformers config for a teacher part: ``given`` (``*_config``), else the config the
    run will load (a local folder's, or a hub id's in the local hub cache), else the paper config
    of a known hub id. Never downloads."""
    from castseg.models.sizes import paper_teacher_configs

    if given is not None:
        return cls(**given) if isinstance(given, dict) else given
    name = name or default
    cached = _cached_config(name, cls)
    if cached is not None:
        return cached
    known = paper_teacher_configs()
    if name.rsplit("/", 1)[-1] in known:
        return cls(**known[name.rsplit("/", 1)[-1]])
    if (Path(name).expanduser() / "config.json").is_file():
        return cls.from_pretrained(str(Path(name).expanduser()))
    raise CastsegError(f"teacher {option} {name!r}: not a known hub id ({', '.join(known)}) nor a local folder "
                       f"with config.json; plan needs its architecture")


def _cached_config(name: str, cls: Any) -> Any:
    """The config.json a hub id already has in the local hub cache, else None (no network)."""
    if Path(name).expanduser().exists() or name.count("/") != 1:
        return None
    try:
        return cls.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def grounded_sam_parts(spec: Any) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """``(detector, segmenter, options)`` of a ``grounded_sam`` teacher spec on the meta device,
    with ``requires_grad`` set as :class:`GroundedSAMTeacher` sets it."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, Sam2Config, Sam2Model

    from castseg.data.coco_io import read_json
    from castseg.models import grounded_sam as gs
    from castseg.models.sizes import on_meta

    opts = {k: p.default for k, p in inspect.signature(gs.GroundedSAMTeacher.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}
    names = {"detector": spec.detector, "segmenter": spec.segmenter}
    if spec.path is not None:  # a teacher written by save_pretrained
        saved = Path(spec.path)
        if not (saved / gs.TEACHER_JSON).is_file():
            raise CastsegError(f"{saved}: not a saved grounded-SAM teacher (no {gs.TEACHER_JSON})")
        opts.update(read_json(saved / gs.TEACHER_JSON).get("options", {}))
        names = {"detector": str(saved / "detector"), "segmenter": str(saved / "segmenter")}
    opts.update(spec.options())
    det_cfg = _hf_config(names["detector"] or opts["detector"], opts["detector_config"] if not spec.path else None,
                         gs.DEFAULT_DETECTOR, GroundingDinoConfig, "detector")
    sam_cfg = _hf_config(names["segmenter"] or opts["segmenter"], opts["segmenter_config"] if not spec.path else None,
                         gs.DEFAULT_SEGMENTER, Sam2Config, "segmenter")
    with torch.device("meta"):
        det, sam = on_meta(GroundingDinoForObjectDetection(det_cfg)), on_meta(Sam2Model(sam_cfg))
    det.requires_grad_(opts["train_detector"])
    sam.requires_grad_(opts["train_mask_decoder"])
    sam.vision_encoder.requires_grad_(opts["train_image_encoder"])
    sam.no_memory_embedding.requires_grad_(opts["train_image_encoder"])
    return det, sam, opts


def text_tokens(class_names: list[str] | None) -> int:
    """Detector prompt tokens: [CLS], each name's words and its ".", [SEP] (one token per word)."""
    from castseg.models.sizes import TEXT_TOKENS

    if not class_names:
        return TEXT_TOKENS
    return 2 + sum(len(n.split()) + 1 for n in class_names)


# --------------------------------------------------------------------- one stage


def _counts(models: list[nn.Module]) -> dict[str, int]:
    params = [p for m in models for p in m.parameters()]
    return {"params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "weight_bytes": sum(t.numel() * t.element_size() for m in models
                                for t in [*m.parameters(), *m.buffers()]),
            "grad_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad)}


def _stage_row(n: dict[str, int], replayed: dict[str, Any], train: bool, amp: str,
               batch: int, size: tuple[int, int], what: str) -> dict[str, Any]:
    """The plan row of one stage from its models' :func:`_counts` and its replayed step."""
    act = replayed["activations"] * (0.5 if amp in ("bf16", "fp16") and train else 1.0)
    mem = {"weights": n["weight_bytes"], "gradients": n["grad_bytes"] if train else 0,
           "optimizer": 8 * n["trainable_params"] if train else 0, "activations": int(act)}
    mem["total"] = sum(mem.values())
    return {"params": n["params"], "trainable_params": n["trainable_params"] if train else 0,
            "gflops_per_step": replayed["flops"] / 1e9, "batch": batch, "size": list(size), "step": what,
            "memory": mem}


@functools.lru_cache(maxsize=32)
def _student_replay(arch_json: str, batch: int, size: tuple[int, int], train: bool, pxl: bool, instances: int,
                    num_points: int) -> tuple[dict[str, Any], dict[str, int]]:
    """``(replayed step, _counts)`` of a student-architecture model, memoised: refine and
    supervised (and repeated plans of one config) share a replay."""
    from castseg.plan_steps import student_step

    model = meta_student(json.loads(arch_json))
    r = student_step(model, batch, size, train=train, pxl=pxl, instances=instances, num_points=num_points)
    return r, _counts([model])


def _student_stage(arch: dict[str, Any], cfg: RunConfig, section: str, lambda_semi: float, lambda_pxl: float,
                   instances: int, train: bool = True, quick: bool = False) -> dict[str, Any]:
    """Plan row of a student-architecture model trained on J (or, ``train=False``, predicting).
    ``quick``: replay one image and scale FLOPs and activations by the batch."""
    tc = cfg.stage_train(section)
    pxl = lambda_pxl > 0 and cfg.data.strong_view
    unlabeled = (cfg.data.unlabeled_batch_size or tc.batch_size) if lambda_semi > 0 else 0
    batch = tc.batch_size + unlabeled if train else 1
    size = tuple(cfg.data.crop_size or (512, 512))
    r, counts = _student_replay(json.dumps(arch, sort_keys=True), 1 if quick else batch, size, train, pxl, instances,
                                cfg.loss.num_points)
    if quick:
        r = {k: v * batch for k, v in r.items()}
    what = (f"J on {tc.batch_size} labeled" + (f" + {unlabeled} unlabeled" if unlabeled else "")
            + " images stacked" + (", L_pxl (+ a no-grad forward of the strong views)" if pxl else "")
            if train else "one no-grad forward per image") + (" (one image replayed, x batch)" if quick else "")
    return _stage_row(counts, r, train, tc.amp if train else "none", batch, size, what)


def _grounded_sam_stage(parts: tuple, cfg: RunConfig, lambda_semi: float, train: bool) -> dict[str, Any]:
    """Plan row of Grounding DINO + SAM2. Training steps are replayed at batch 1 and 2 (memoised
    in ``parts``' last item, shared by adapt/a and adapt/c) and extrapolated linearly to the
    stage's batch: every image adds the same work, and a replay takes seconds per image."""
    from castseg.plan_steps import grounded_sam_step

    det, sam, opts, memo = parts
    tc = cfg.stage_train("adapt")
    unlabeled = (cfg.data.unlabeled_batch_size or tc.batch_size) if lambda_semi > 0 else 0
    batch = tc.batch_size + unlabeled if train else 1
    size = tuple(cfg.data.crop_size or (512, 512))
    tokens = text_tokens(opts.get("class_names"))
    for b in ((1, 2) if train else (1,)):
        if (b, train) not in memo:
            memo[(b, train)] = grounded_sam_step(det, sam, b, size, opts, train=train, text_tokens=tokens)
    if train:
        one, two = memo[(1, True)], memo[(2, True)]
        r = {k: one[k] + (two[k] - one[k]) * (batch - 1) for k in ("flops", "activations")}
    else:
        r = memo[(1, False)]
    what = (f"detector + SAM2 mask decoder losses on {batch} images ({opts['max_mask_prompts']} box prompts each; "
            f"replayed at batch 1 and 2, linear in the batch)" if train
            else f"detector + SAM2 on one image, {opts['max_detections']} boxes")
    return _stage_row(_counts([det, sam]), r, train, tc.amp if train else "none", batch, size, what)


def teacher_model(cfg: RunConfig) -> tuple[str, Any]:
    """``("student", architecture)`` of a checkpoint teacher, ``("grounded_sam", (detector,
    segmenter, options))`` on the meta device, or ``("skipped", why)``."""
    spec = cfg.teacher
    if spec is None:
        return "skipped", "no teacher section"
    if spec.type == "checkpoint":
        from castseg.data.coco_io import read_json
        from castseg.models.checkpoint import checkpoint_paths

        meta_path = checkpoint_paths(spec.path)[1]
        if not meta_path.is_file():
            raise CastsegError(f"teacher.path {spec.path}: no {meta_path.name} to read the architecture from")
        return "student", read_json(meta_path)["architecture"]
    if spec.type == "grounded_sam":
        return "grounded_sam", (*grounded_sam_parts(spec), {})
    return "skipped", f"{spec.type} teachers are not estimated"


def _teacher_stage(teacher: tuple[str, Any], cfg: RunConfig, lambda_semi: float, train: bool,
                   instances: int, quick: bool = False) -> dict[str, Any]:
    """Plan row of the teacher in adapt/a (``lambda_semi=0``), adapt/c, or predicting."""
    kind, what = teacher
    if kind == "student":
        return _student_stage(what, cfg, "adapt", lambda_semi, cfg.loss.lambda_pxl, instances, train, quick)
    if kind == "grounded_sam":
        return _grounded_sam_stage(what, cfg, lambda_semi, train)
    return {"skipped": what}


# --------------------------------------------------------------------- the plan


def _instances(cfg: RunConfig) -> tuple[int, str]:
    """Matched instances per image the set loss gathers: the labeled json's mean, else a default."""
    labeled = cfg.data.labeled
    if labeled and Path(labeled).is_file():
        from castseg.data.coco_io import read_json

        coco = read_json(labeled)
        n = len(coco.get("annotations", [])) / max(len(coco.get("images", [])), 1)
        return max(1, round(n)), f"{n:.1f} instances per image (mean of {labeled})"
    return DEFAULT_INSTANCES, f"{DEFAULT_INSTANCES} instances per image (assumed; data.labeled not found)"


def stage_plans(cfg: RunConfig, instances: int, quick: bool = False) -> dict[str, dict[str, Any]]:
    """``{stage: plan row}`` for every stage of ``castseg run``."""
    arch = cfg.model.model_dump()
    loss = cfg.loss
    teacher = teacher_model(cfg)
    return {"adapt/a": _teacher_stage(teacher, cfg, 0.0, True, instances, quick),
            "adapt/c": _teacher_stage(teacher, cfg, 1.0, True, instances, quick),
            "pseudo-label": _teacher_stage(teacher, cfg, 0.0, False, instances, quick),
            "distill": _student_stage(arch, cfg, "distill", loss.lambda_semi, loss.lambda_pxl, instances, quick=quick),
            "refine": _student_stage(arch, cfg, "refine", 0.0, 0.0, instances, quick=quick),
            "supervised": _student_stage(arch, cfg, "supervised", 0.0, 0.0, instances, quick=quick)}


def data_plan(cfg: RunConfig, stages: dict[str, dict[str, Any]], measure: bool = True) -> dict[str, Any]:
    """Images decoded per step of each stage and, when the labeled json exists (and
    ``measure``), the mean seconds to decode + transform one sample and per step per worker."""
    per_step = {k: v["batch"] for k, v in stages.items() if "batch" in v}
    out: dict[str, Any] = {"images_per_step": per_step, "seconds_per_image": None}
    labeled = cfg.data.labeled
    if not (measure and labeled and Path(labeled).is_file()):
        out["measured"] = "not measured (data.labeled not found)" if measure else "not measured"
        return out
    from castseg.data.dataset import CocoInstanceDataset
    from castseg.data.transforms import WeakView

    d = cfg.data
    weak = WeakView(crop_size=d.crop_size, scale_range=d.scale_range, hflip=d.hflip, vflip=d.vflip,
                    invert=d.invert, tint=d.tint, stain=d.stain)
    ds = CocoInstanceDataset(labeled, d.images_root, transform=weak, strong_view=d.strong_view)
    n = min(DATA_SAMPLES, len(ds))
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    sec = (time.perf_counter() - start) / max(n, 1)
    out.update(seconds_per_image=sec, measured=f"mean of {n} samples of {labeled} (decode + weak view"
               + (" + strong view" if d.strong_view else "") + ")",
               seconds_per_step_per_worker={k: sec * v for k, v in per_step.items()})
    return out


def plan_run(cfg: RunConfig, measure_data: bool = True, instances: int | None = None,
             quick: bool = False) -> dict[str, Any]:
    """The plan of a run (JSON-able): ``{"stages": {name: row}, "data": {...}, "assumptions": [...]}``;
    a row holds ``params``, ``trainable_params``, ``gflops_per_step``, ``batch``, ``size`` and
    ``memory`` (bytes: ``weights``, ``gradients``, ``optimizer``, ``activations``, ``total``), or
    ``skipped``. ``instances``: matched instances per image of the set loss (default: counted).
    ``quick`` (``castseg run``'s summary): student-architecture steps replayed for one image and
    scaled by the batch (a few % high: per-step constants are scaled too)."""
    counted, how = (instances, f"{instances} instances per image (given)") if instances else _instances(cfg)
    stages = stage_plans(cfg, counted, quick)
    assumptions = [
        "models built on the meta device (no weights, no data); one step replayed on meta tensors",
        "GFLOPs: torch.utils.flop_counter over forward + backward (matmuls, convolutions, attention; "
        "2 FLOPs per multiply-add); element-wise ops not counted",
        "memory per GPU process: weights + gradients + AdamW (2 fp32 tensors per trainable param) + peak "
        "activations of the step (forward, loss, backward); CUDA context and allocator cache not included",
        f"set loss approximated without Hungarian matching: {how}, {cfg.loss.num_points} points each, every "
        "decoder layer",
        "Grounding DINO + SAM2: detector loss replaced by a sum of its outputs; adapt/c's two forwards "
        "(labeled, unlabeled) counted as one of both batches",
        "pseudo-label pass at the crop size, one image at a time",
    ]
    if cfg.train.amp in ("bf16", "fp16"):
        assumptions.append(f"amp {cfg.train.amp}: training activations counted at half of fp32")
    return {"stages": stages, "data": data_plan(cfg, stages, measure_data), "assumptions": assumptions}


# --------------------------------------------------------------------- text


def summary_lines(plan: dict[str, Any]) -> list[str]:
    """One line per stage: params, GFLOPs per step and the estimated peak GiB."""
    lines = []
    for name, row in plan["stages"].items():
        if "skipped" in row:
            lines.append(f"{name:<13} skipped: {row['skipped']}")
            continue
        lines.append(f"{name:<13} {row['params'] / 1e6:8.1f}M params ({row['trainable_params'] / 1e6:.1f}M "
                     f"trainable)  {row['gflops_per_step']:9.1f} GFLOPs/step  "
                     f"~{row['memory']['total'] / GiB:.2f} GiB peak per GPU process")
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """The human table of :func:`plan_run`'s dict."""
    head = ("stage", "batch", "params", "trainable", "GFLOPs/step", "weights", "grads", "AdamW", "activ.", "total")
    rows = [head]
    for name, row in plan["stages"].items():
        if "skipped" in row:
            rows.append((name, "-", "-", "-", "-", "-", "-", "-", "-", row["skipped"]))
            continue
        m = row["memory"]
        rows.append((name, str(row["batch"]), f"{row['params'] / 1e6:.1f}M", f"{row['trainable_params'] / 1e6:.1f}M",
                     f"{row['gflops_per_step']:.1f}",
                     *(f"{m[k] / GiB:.2f}" for k in ("weights", "gradients", "optimizer", "activations", "total"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "memory in GiB per GPU process; total = weights + grads + AdamW + activations (an upper bound)")
    for name, row in plan["stages"].items():
        if "step" in row:
            lines.append(f"  {name}: {row['size'][0]}x{row['size'][1]}, {row['step']}")
    d = plan["data"]
    per = ", ".join(f"{k} {v}" for k, v in d["images_per_step"].items())
    lines.append(f"data: images decoded per step: {per}")
    if d.get("seconds_per_image") is not None:
        lines.append(f"  {d['seconds_per_image'] * 1e3:.0f} ms per image ({d['measured']}); per step per worker: "
                     + ", ".join(f"{k} {v:.2f}s" for k, v in d["seconds_per_step_per_worker"].items()))
    else:
        lines.append(f"  decode time {d['measured']}")
    lines += ["assumptions:"] + [f"  - {a}" for a in plan["assumptions"]]
    return "\n".join(lines)
