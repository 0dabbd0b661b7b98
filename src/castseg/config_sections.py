"""Typed config sections (pydantic v2, ``extra="forbid"``): one model per concern.

``train`` / ``data`` / ``eval`` / ``loss`` / ``pseudo_labels`` / the stage sections and the
``teacher`` union keyed on ``type`` (checkpoint | grounded_sam | ensemble | tta). Every section
owns its defaults; loading, ``extends`` and overrides live in :mod:`castseg.config`, which turns
a :class:`pydantic.ValidationError` into one line naming the file and the dotted key
(:func:`describe_error`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_serializer,
                      field_validator, model_validator)

from castseg.errors import describe_error, error_key  # noqa: F401  (their home; imported from here by config)


class Section(BaseModel):
    """Base of every section: unknown keys are errors; ``to_dict`` is JSON/YAML-able."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _n_values(n: int):
    def check(v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) != n:
            raise ValueError(f"expected {n} values, got {len(v)} ({list(v)!r})")
        return v
    return BeforeValidator(check)


Pair = Annotated[tuple[float, float], _n_values(2)]
Size = Annotated[tuple[int, int], _n_values(2)]


def _at_least(lo: float, strict: bool, *names: str):
    """A field validator: every named field must be > lo (``strict``) or >= lo."""
    def check(cls, v):
        if not (v > lo if strict else v >= lo):
            raise ValueError(f"must be {'>' if strict else '>='} {lo:g}, got {v}")
        return v
    return field_validator(*names)(classmethod(check))


class TrainConfig(Section):
    """One training run of :class:`castseg.engine.Trainer` (one stage). Steps are optimizer steps."""

    max_steps: int = 1000
    batch_size: int = 4                      # per process (GPU); the global batch is × world size × accumulate
    lr: float = 1e-4                         # head lr; the encoder gets lr × backbone_lr_mult
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.05
    betas: Pair = (0.9, 0.999)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0                    # linear warm-up from lr/warmup_steps to lr
    grad_clip: float = 1.0                   # max total gradient L2 norm; 0 disables clipping
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 only on CUDA (with a GradScaler)
    accumulate: int = 1                      # micro-batches per optimizer step
    val_every: int = 0                       # steps between validations; 0 = only at the end
    ckpt_every: int = 500                    # steps between resumable checkpoints; 0 = only at the end
    log_every: int = 20
    # DataLoader worker processes per stream; "auto": on a GPU, the process's share of the CPUs
    # (up to 8; decoding a Cityscapes crop takes ~0.5 s of a core), on a CPU 0 (workers would
    # take the cores the model computes on)
    num_workers: int | Literal["auto"] = "auto"
    seed: int = 0
    device: str = "auto"                     # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    find_unused_parameters: bool = True      # DDP; False is faster when every parameter gets a gradient
    # NHWC weights: CPU convolutions run ~1.2x faster per distillation step (benchmarks/bench_train_step.py);
    # same maths, so not a trajectory field
    channels_last: bool = False
    tf32: bool = True                        # CUDA: TF32 matmuls/convolutions (Ampere+), as most GPU trainers
    compile: bool = False                    # torch.compile the trained model (CUDA; first steps compile)
    best_metric: str = "AP"                  # val metric that defines "best" in val_metrics.json
    best_mode: Literal["max", "min"] = "max"
    save_best: bool = False                  # also keep the best model in checkpoints/best/

    # The fields that change the training trajectory: resuming with different values is refused.
    TRAJECTORY: ClassVar[tuple[str, ...]] = (
        "max_steps", "batch_size", "lr", "backbone_lr_mult", "weight_decay", "betas", "schedule", "poly_power",
        "warmup_steps", "grad_clip", "amp", "accumulate", "seed")

    _positive = _at_least(0, True, "max_steps", "batch_size", "accumulate", "log_every", "lr", "poly_power")
    _non_negative = _at_least(0, False, "warmup_steps", "grad_clip", "val_every", "ckpt_every",
                              "backbone_lr_mult", "weight_decay")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be >= 0 or 'auto', got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N, got {v!r}")
        return v


class DataConfig(Section):
    """Where the images are and how training views are made."""

    labeled: str | None = None               # COCO instances json
    unlabeled: str | None = None             # COCO json (annotations ignored) or image folder
    val: str | None = None                   # COCO instances json
    # The unlabeled images' own annotations (castseg split's unlabeled_gt.json), when known:
    # only for scoring the pseudo-labels (metrics.json, report); no stage trains on them.
    unlabeled_gt: str | None = None
    images_root: str | None = None
    crop_size: Size | None = None            # training crop (h, w); None keeps the resized image
    scale_range: Pair = (0.5, 2.0)
    hflip: float = 0.5
    vflip: float = 0.0
    invert: float = 0.0                      # chance of 1 - image (WeakView)
    tint: float = 0.0                        # per-channel gain in [1 - tint, 1 + tint] (WeakView)
    stain: float = 0.0                       # chance of an H&E-like colour map (WeakView)
    strong_view: bool = True
    unlabeled_batch_size: int | None = None  # None: train.batch_size
    size_divisibility: int = 32
    val_max_size: int | None = None          # longer side cap for validation images

    @field_validator("scale_range")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must satisfy 0 < lo <= hi, got {list(v)}")
        return v

    @field_validator("invert", "stain", "hflip", "vflip")
    @classmethod
    def _chance(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v

    @field_validator("tint")
    @classmethod
    def _tint(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v


class EvalConfig(Section):
    """Inference + COCO evaluation (:mod:`castseg.evaluate`)."""

    # 1: a ViT attends over a batch's zero padding, so images of different sizes batched together
    # get different predictions (measured on DSB2018 grey val: AP 0.039 at 1 vs 0.028 at 2)
    batch_size: int = 1
    topk: int = 100                          # instances kept per image
    max_dets: int = 100                      # COCO maxDets (dense scenes need more)
    max_size: int | None = None              # longer side cap at inference (None: data.val_max_size)
    mask_threshold: float = 0.5
    score_threshold: float = 0.0
    iou_type: Literal["segm", "bbox"] = "segm"


class LossConfig(Section):
    """CAST's objective (METHOD.md): J = L_sup + λ_semi · L_semi + λ_pxl · L_pxl, and its parts."""

    lambda_semi: float = 1.0
    lambda_pxl: float = 0.1
    temperature: float = 0.1                 # L_pxl's τ
    num_negatives: int = 200                 # L_pxl negatives per anchor
    sampler: Literal["fused", "uniform", "mask", "class"] = "fused"
    max_anchors: int = 1024
    num_points: int = 12544                  # points per mask of the set loss (Mask2Former's 112²)
    score_threshold: float = 0.3             # pseudo-labels below it are dropped (L_semi)
    weight_by_score: bool = False            # weight each pseudo-label instance by its score
    # Cleaning L_semi's pseudo-labels when read (castseg.pseudo_labels.clean); off by default.
    pseudo_label_overlaps: Literal["keep", "exclusive"] = "keep"  # exclusive: one instance per pixel
    pseudo_label_split: bool = False         # split pieces and touching convex objects apart
    pseudo_label_min_area: int = 0           # drop pseudo-labels under this many pixels

    _non_negative = _at_least(0, False, "lambda_semi", "lambda_pxl", "pseudo_label_min_area")
    _positive = _at_least(0, True, "temperature", "num_negatives", "max_anchors", "num_points")


class PseudoLabelsConfig(Section):
    """How the frozen teacher labels D_u (:func:`castseg.stages.pseudo_label`)."""

    tta: list[Literal["h", "v", "hv"]] = []  # extra flipped views, fused (castseg.models.tta)
    max_size: int | None = None              # longer side cap of the unlabeled images


# A stage's partial ``train`` overrides: TrainConfig's keys, each optional (unset = the ``train``
# section's value); their values are checked against TrainConfig when the stage resolves them.
TrainOverrides = create_model("TrainOverrides", __base__=Section,
                              **{k: (f.annotation | None, None) for k, f in TrainConfig.model_fields.items()})


class StageConfig(Section):
    """``adapt`` / ``distill`` / ``refine`` / ``supervised``: the stage's ``train`` overrides, e.g.
    ``distill: {train: {max_steps: 9000}}``."""

    train: TrainOverrides = TrainOverrides()  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _resolvable(self) -> "StageConfig":
        try:
            TrainConfig.model_validate(self.overrides())
        except ValidationError as e:
            raise ValueError(describe_error(e, "train", TrainConfig)) from None
        return self

    def overrides(self) -> dict[str, Any]:
        return self.train.model_dump(exclude_unset=True)

    @field_serializer("train")
    def _only_given(self, train: Any) -> dict[str, Any]:
        return train.model_dump(mode="json", exclude_unset=True)


class AdaptConfig(StageConfig):
    """``adapt``: stage 1's ``train`` overrides and which teacher stage 2 distils from
    (:mod:`castseg.teacher_selection`)."""

    teacher_selection: Literal["best", "paper"] = "best"  # best: the best val AP of θ_T⁰, θ_T', θ_T''
    selection_holdout: float = Field(0.2, gt=0, lt=1)     # labeled share held out of stage 1 without data.val


# --- teachers ---------------------------------------------------------------------------------


class CheckpointTeacherSpec(Section):
    """A castseg checkpoint (a student-architecture model such as the ``lite_teacher`` stand-in)."""

    type: Literal["checkpoint"] = "checkpoint"
    path: str
    device: str = "auto"                     # auto: this process's GPU if there is one, else the CPU
    class_names: list[str] | None = None     # default: the checkpoint's
    postprocess_kwargs: dict[str, Any] = {}  # castseg.models.inference.postprocess_instances options


class OnnxTeacherSpec(Section):
    """An exported student (``castseg export``), run by onnxruntime: predicts, cannot adapt."""

    type: Literal["onnx"] = "onnx"
    path: str
    device: str = "cpu"                      # cuda*: onnxruntime's CUDA provider where installed
    threads: int | None = None               # onnxruntime intra-op threads (None: its default)
    class_names: list[str] | None = None     # default: the file's metadata
    postprocess_kwargs: dict[str, Any] = {}  # castseg.models.inference.postprocess_instances options


class GroundedSamTeacherSpec(Section):
    """The paper's Grounding DINO + SAM2 (hub ids or local folders), or ``path``: a teacher
    saved with ``save_pretrained`` (the other keys then override its stored options)."""

    type: Literal["grounded_sam"] = "grounded_sam"
    path: str | None = None
    detector: str | None = None
    segmenter: str | None = None
    tokenizer: str | None = None
    class_names: list[str] | None = None
    pretrained: bool | None = None
    detector_config: dict[str, Any] | None = None
    segmenter_config: dict[str, Any] | None = None
    box_threshold: float | None = None
    text_threshold: float | None = None
    nms_iou: float | None = None
    mask_threshold: float | None = None
    max_detections: int | None = None
    train_detector: bool | None = None
    train_mask_decoder: bool | None = None
    train_image_encoder: bool | None = None
    detector_size: Size | None = None
    det_loss_weight: float | None = None
    mask_bce_weight: float | None = None
    mask_dice_weight: float | None = None
    max_mask_prompts: int | None = None
    box_chunk: int | None = None

    def options(self) -> dict[str, Any]:
        """The constructor options that were given (unset ones keep GroundedSAMTeacher's defaults)."""
        return {k: v for k, v in self.model_dump(exclude={"type", "path"}).items() if v is not None}


class EnsembleTeacherSpec(Section):
    """Several teachers merged by mask-NMS (:class:`~castseg.models.teacher.EnsembleTeacher`)."""

    type: Literal["ensemble"] = "ensemble"
    members: list[TeacherSpec] = Field(min_length=1)
    weights: list[float] | None = None
    mask_nms_iou: float = 0.5
    class_agnostic: bool = False
    max_detections: int | None = None
    class_names: list[str] | None = None


class TTATeacherSpec(Section):
    """A member teacher on flipped views, fused (:class:`~castseg.models.tta.TTATeacher`)."""

    type: Literal["tta"] = "tta"
    member: TeacherSpec
    flips: list[Literal["h", "v", "hv"]] = ["h", "v"]
    mask_nms_iou: float = 0.5
    max_detections: int | None = None
    class_names: list[str] | None = None


TeacherSpec = Annotated[Union[CheckpointTeacherSpec, OnnxTeacherSpec, GroundedSamTeacherSpec, EnsembleTeacherSpec, TTATeacherSpec],
                        Field(discriminator="type")]
EnsembleTeacherSpec.model_rebuild()
TTATeacherSpec.model_rebuild()
