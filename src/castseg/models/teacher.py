"""Teachers: models that pseudo-label images with instances, and can be adapted on labeled data.

Every teacher follows one contract (:class:`Teacher`):

- ``predict(images [B,3,H,W] float in [0,1], class_names)`` → B dicts ``{"masks": bool [K,H,W],
  "scores": float [K] (descending), "labels": int64 [K] in [0, C)}``, computed in eval mode without
  gradients (the module's train/eval mode is restored afterwards).
- ``loss(images, targets, class_names)`` → dict of scalar tensors with a differentiable ``"loss"``;
  ``targets`` are B dicts ``{"labels": int64 [N], "masks": bool [N,H,W]}`` (stage-1 adaptation).
- ``trainable_parameters()`` → the parameters adaptation should optimise.

Implementations: :class:`~castseg.models.grounded_sam.GroundedSAMTeacher` (the paper's Grounding
DINO + SAM2), :class:`ModelTeacher` (any student-architecture model, e.g. the ``large`` preset),
:class:`EnsembleTeacher` and :class:`~castseg.models.tta.TTATeacher`.
:func:`castseg.models.teacher_factory.build_teacher` builds any of them from a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from castseg.errors import CastsegError

Instances = dict[str, Tensor]


class Teacher(nn.Module):
    """Base class. Subclasses implement :meth:`_predict` (called in eval mode, under no_grad) and
    :meth:`loss`; ``class_names`` given at construction are the default for both."""

    def __init__(self, class_names: Sequence[str] | None = None):
        super().__init__()
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None

    def resolve_class_names(self, class_names: Sequence[str] | None) -> list[str]:
        names = list(class_names) if class_names is not None else self.class_names
        if not names:
            raise CastsegError("the teacher needs class names (none were given and none are stored with it)")
        return names

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def predict(self, images: Tensor, class_names: Sequence[str] | None = None) -> list[Instances]:
        """Instances per image; see the module docstring for shapes."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got {list(images.shape)}")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._predict(images.to(self.device), self.resolve_class_names(class_names))
        finally:
            self.train(was_training)

    def _predict(self, images: Tensor, class_names: list[str]) -> list[Instances]:
        raise NotImplementedError

    def loss(self, images: Tensor, targets: Sequence[dict[str, Tensor]],
             class_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def backbone_prefixes(self) -> tuple[str, ...]:
        """Names (prefixes of ``named_parameters``) of the pretrained backbones, which adapt at
        ``train.lr × backbone_lr_mult`` like the student's encoder; the rest at ``train.lr``."""
        return ()

    def forward(self, images: Tensor, targets: Sequence[dict[str, Tensor]],
                class_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """:meth:`loss` — so that DistributedDataParallel, which hooks ``forward``, can wrap a
        teacher that adapts."""
        return self.loss(images, targets, class_names)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the teacher to the folder ``path`` so that ``load_teacher(path)`` rebuilds it."""
        raise CastsegError(f"{type(self).__name__} cannot be saved; adapt it through a saveable teacher")


# ---------------------------------------------------------------- boxes, masks, NMS (pure torch)

def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of xyxy boxes ``a [N,4]`` and ``b [M,4]`` → ``[N,M]``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def mask_iou(a: Tensor, b: Tensor, max_elements: int = 2 ** 24) -> Tensor:
    """IoU of binary masks ``a [N,H,W]`` and ``b [M,H,W]`` → ``[N,M]`` (float32).

    Intersections are matrix products of float blocks of at most ``max_elements`` values each
    (64 MB by default), so memory stays bounded however many and however large the masks are."""
    n, m = len(a), len(b)
    out = torch.zeros(n, m, device=a.device)
    if n == 0 or m == 0:
        return out
    af, bf = a.flatten(1), b.flatten(1)
    chunk = max(1, max_elements // af.shape[1])
    area_a, area_b = af.sum(1).float(), bf.sum(1).float()
    for i in range(0, n, chunk):
        ai = af[i:i + chunk].float()
        for j in range(0, m, chunk):
            inter = ai @ bf[j:j + chunk].float().T
            union = area_a[i:i + chunk, None] + area_b[None, j:j + chunk] - inter
            out[i:i + chunk, j:j + chunk] = inter / union.clamp(min=1.0)
    return out


def nms_from_iou(iou: Tensor, scores: Tensor, threshold: float, labels: Tensor | None = None) -> Tensor:
    """Greedy NMS given a pairwise IoU matrix ``[N,N]``: indices of the kept items, by descending
    score. With ``labels``, only items of the same label suppress each other (class-aware)."""
    order = torch.argsort(scores, descending=True, stable=True)
    if labels is not None:
        iou = iou * (labels[:, None] == labels[None, :])
    over = (iou > threshold).cpu()
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return torch.as_tensor(keep, dtype=torch.int64, device=scores.device)


def nms(boxes: Tensor, scores: Tensor, threshold: float, labels: Tensor | None = None) -> Tensor:
    """Greedy box NMS (torchvision.ops.batched_nms semantics when ``labels`` is given): indices
    of the kept xyxy ``boxes [N,4]``, by descending score."""
    return nms_from_iou(box_iou(boxes, boxes), scores, threshold, labels)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes ``[N,4]`` of binary masks ``[N,H,W]`` in pixel-edge coordinates (a mask
    covering only pixel (0,0) has box (0,0,1,1)); empty masks give an all-zero box."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ys, h).min(1).values
    y1 = torch.where(rows, ys, -1).max(1).values + 1
    x0 = torch.where(cols, xs, w).min(1).values
    x1 = torch.where(cols, xs, -1).max(1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def empty_instances(h: int, w: int, device: torch.device | str = "cpu") -> Instances:
    return {"masks": torch.zeros(0, h, w, dtype=torch.bool, device=device),
            "scores": torch.zeros(0, device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device)}


# ---------------------------------------------------------------- a student-architecture model as teacher

class ModelTeacher(Teacher):
    """Any model whose ``forward(images)`` returns ``{"pred_logits": [B,Q,C+1], "pred_masks":
    [B,Q,h,w], "aux_outputs": [...]}`` (a :class:`~castseg.models.student.StudentModel`, e.g. the
    ``large`` preset), used as a teacher.

    Args:
        model: the network (it normalises its own [0,1] input).
        class_names: C names (must match the model's C).
        postprocess_kwargs: extra arguments of
            :func:`castseg.models.inference.postprocess_instances` (``topk``, ``mask_threshold``...).
        loss_fn: ``loss_fn(outputs, targets) -> dict`` with ``"loss"``; default: castseg's
            Mask2Former :class:`~castseg.losses.set_loss.SetLoss` with C classes.
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str] | None = None,
                 postprocess_kwargs: dict[str, Any] | None = None,
                 loss_fn: Callable[[dict[str, Any], Sequence[dict[str, Tensor]]], dict[str, Tensor]] | None = None):
        super().__init__(class_names)
        self.model = model
        self.postprocess_kwargs = dict(postprocess_kwargs or {})
        self.loss_fn = loss_fn

    def _check_classes(self, outputs: dict[str, Any], class_names: list[str]) -> int:
        c = outputs["pred_logits"].shape[-1] - 1
        if c != len(class_names):
            raise CastsegError(f"the teacher model predicts {c} classes but {len(class_names)} class names were "
                               f"given ({class_names[:5]}...)")
        return c

    def _predict(self, images: Tensor, class_names: list[str]) -> list[Instances]:
        from castseg.models.inference import outputs_to_instances

        out = self.model(images)
        self._check_classes(out, class_names)
        size = tuple(images.shape[-2:])
        b = images.shape[0]
        return outputs_to_instances(out, [tuple(out.get("image_size", size))] * b, [size] * b,
                                    **self.postprocess_kwargs)

    def backbone_prefixes(self) -> tuple[str, ...]:
        return ("model.encoder.",)

    def save_pretrained(self, path: str | Path) -> Path:
        from castseg.models.checkpoint import save_checkpoint

        save_checkpoint(path, self.model, None, self.resolve_class_names(None), step=0)
        return Path(path)

    def loss(self, images: Tensor, targets: Sequence[dict[str, Tensor]],
             class_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        out = self.model(images.to(self.device))
        c = self._check_classes(out, self.resolve_class_names(class_names))
        if self.loss_fn is None:
            from castseg.losses.set_loss import SetLoss

            self.loss_fn = SetLoss(num_classes=c)
        return self.loss_fn(out, targets)


# ---------------------------------------------------------------- ensemble

class EnsembleTeacher(Teacher):
    """Several teachers whose instances are merged: each member's scores are multiplied by its
    weight, all instances are ranked by score and greedy mask-NMS (IoU of binary masks, class-aware
    unless ``class_agnostic``) removes duplicates.

    Args:
        teachers: the members (any :class:`Teacher`).
        weights: one score multiplier per member (default 1 each).
        mask_nms_iou: masks overlapping a higher-scored kept mask by more than this are dropped.
        class_agnostic: suppress across classes too.
        max_detections: keep at most this many instances per image (``None``: all).
    """

    def __init__(self, teachers: Sequence[Teacher], weights: Sequence[float] | None = None,
                 mask_nms_iou: float = 0.5, class_agnostic: bool = False, max_detections: int | None = None,
                 class_names: Sequence[str] | None = None):
        super().__init__(class_names)
        if not teachers:
            raise CastsegError("an ensemble teacher needs at least one member")
        if weights is not None and len(weights) != len(teachers):
            raise CastsegError(f"ensemble: {len(weights)} weights for {len(teachers)} members")
        self.teachers = nn.ModuleList(teachers)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(teachers)
        self.mask_nms_iou, self.class_agnostic, self.max_detections = mask_nms_iou, class_agnostic, max_detections

    def resolve_class_names(self, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None and self.class_names is None:
            for t in self.teachers:  # fall back to the first member that stores names
                if t.class_names:
                    return list(t.class_names)
        return super().resolve_class_names(class_names)

    def _predict(self, images: Tensor, class_names: list[str]) -> list[Instances]:
        per_member = [t.predict(images, class_names) for t in self.teachers]
        results = []
        for i in range(images.shape[0]):
            masks = torch.cat([m[i]["masks"].to(images.device) for m in per_member])
            labels = torch.cat([m[i]["labels"].to(images.device) for m in per_member])
            scores = torch.cat([m[i]["scores"].to(images.device).float() * w
                                for m, w in zip(per_member, self.weights)])
            keep = nms_from_iou(mask_iou(masks, masks), scores, self.mask_nms_iou,
                                None if self.class_agnostic else labels)
            if self.max_detections is not None:
                keep = keep[: self.max_detections]
            results.append({"masks": masks[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    def backbone_prefixes(self) -> tuple[str, ...]:
        return tuple(f"teachers.{k}.{p}" for k, t in enumerate(self.teachers) for p in t.backbone_prefixes())

    def save_pretrained(self, path: str | Path) -> Path:
        """Each member in ``member<k>/`` and ``teacher.yaml`` (an ensemble config over them)."""
        members = [save_member(t, Path(path) / f"member{k}") for k, t in enumerate(self.teachers)]
        return write_teacher_yaml(path, {"type": "ensemble", "members": members, "weights": self.weights,
                                         "mask_nms_iou": self.mask_nms_iou, "class_agnostic": self.class_agnostic,
                                         "max_detections": self.max_detections, "class_names": self.class_names})

    def loss(self, images: Tensor, targets: Sequence[dict[str, Tensor]],
             class_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Adapting an ensemble adapts every member: ``loss = Σ weight_i · loss_i``."""
        out: dict[str, Tensor] = {}
        total = None
        for k, (t, w) in enumerate(zip(self.teachers, self.weights)):
            terms = t.loss(images, targets, class_names if class_names is not None else self.class_names)
            out.update({f"member{k}_{name}": v for name, v in terms.items()})
            total = w * terms["loss"] if total is None else total + w * terms["loss"]
        out["loss"] = total
        return out


# ---------------------------------------------------------------- saving composite teachers

def save_member(teacher: Teacher, folder: Path) -> dict[str, Any]:
    """Save a member of a composite teacher to ``folder``; its spec entry, ``path`` relative to
    the composite's folder (what ``load_teacher`` resolves a ``teacher.yaml``'s paths against)."""
    saved = Path(teacher.save_pretrained(folder))
    if (saved / "teacher.yaml").is_file():
        raise CastsegError(f"{type(teacher).__name__} inside a composite teacher cannot be saved (nested "
                           f"ensemble / tta); save its members one level up")
    return {"type": "checkpoint" if (saved / "model.json").is_file() else "grounded_sam", "path": saved.name}


def write_teacher_yaml(path: str | Path, spec: dict[str, Any]) -> Path:
    """``path/teacher.yaml`` holding ``spec`` (the folder ``load_teacher`` then reads); returns ``path``."""
    import yaml

    from castseg.atomic import atomic_write_text

    atomic_write_text(Path(path) / "teacher.yaml", yaml.safe_dump({"teacher": spec}, sort_keys=False))
    return Path(path)
