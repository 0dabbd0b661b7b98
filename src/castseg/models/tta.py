"""Test-time-augmented teacher: one teacher run on flipped views, the instances fused by mask voting.

Pseudo-labels are only as good as the teacher; a cheap way to make a teacher better at test time
is to ask it several times. :class:`TTATeacher` runs a member teacher on the image and its
horizontal / vertical flips, flips the masks back, and fuses duplicates: greedy mask-NMS over
all views picks one representative per object; the object's mask is the pixel-wise majority of
the masks that overlap the representative by more than ``mask_nms_iou`` (one per view at most),
and its score the mean over *all* views (a view that missed the object counts 0, so objects
seen in one view only are down-weighted). Build with ``{"type": "tta", "member": {...}}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from castseg.errors import CastsegError
from castseg.models.teacher import Instances, Teacher, mask_iou, nms_from_iou, save_member, write_teacher_yaml

FLIPS = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}


class TTATeacher(Teacher):
    """``member`` on the identity view plus ``flips`` (any of ``"h"``, ``"v"``, ``"hv"``).

    ``predict`` → B dicts ``{"masks": bool [K,H,W], "scores": float [K] descending, "labels"
    int64 [K]}`` like every teacher; ``loss`` adapts the member (the views are a test-time device).
    """

    def __init__(self, member: Teacher, flips: Sequence[str] = ("h", "v"), mask_nms_iou: float = 0.5,
                 max_detections: int | None = None, class_names: Sequence[str] | None = None):
        super().__init__(class_names if class_names is not None else member.class_names)
        unknown = sorted(set(flips) - set(FLIPS))
        if unknown:
            raise CastsegError(f"teacher type 'tta': unknown flip(s) {unknown}; choose from {sorted(FLIPS)}")
        self.member = member
        self.flips = list(flips)
        self.mask_nms_iou, self.max_detections = mask_nms_iou, max_detections

    def backbone_prefixes(self) -> tuple[str, ...]:
        return tuple(f"member.{p}" for p in self.member.backbone_prefixes())

    def _predict(self, images: Tensor, class_names: list[str]) -> list[Instances]:
        views = [self.member.predict(images, class_names)]
        for f in self.flips:
            dims = FLIPS[f]
            flipped = self.member.predict(images.flip(dims), class_names)
            views.append([{**r, "masks": r["masks"].flip(dims)} for r in flipped])
        return [self._fuse([v[i] for v in views]) for i in range(images.shape[0])]

    def _fuse(self, per_view: list[Instances]) -> Instances:
        masks = torch.cat([r["masks"] for r in per_view])
        scores = torch.cat([r["scores"].float() for r in per_view])
        labels = torch.cat([r["labels"] for r in per_view])
        view = torch.cat([torch.full((len(r["scores"]),), k) for k, r in enumerate(per_view)])
        if len(scores) == 0:
            return {"masks": masks, "scores": scores, "labels": labels}
        iou = mask_iou(masks, masks) * (labels[:, None] == labels[None, :])
        keep = nms_from_iou(iou, scores, self.mask_nms_iou)
        if self.max_detections is not None:
            keep = keep[: self.max_detections]
        n_views = len(per_view)
        fused_masks, fused_scores = [], []
        for k in keep.tolist():
            # the best-overlapping instance of each view (the representative stands for its own)
            group = []
            for v in range(n_views):
                cand = torch.nonzero((view == v) & (iou[k] > self.mask_nms_iou)).flatten()
                if len(cand):
                    group.append(int(cand[iou[k, cand].argmax()]))
            votes = masks[group].float().sum(0)
            fused_masks.append(votes * 2 > len(group) if len(group) > 1 else masks[k])
            fused_scores.append(scores[group].sum() / n_views)
        s = torch.stack(fused_scores)
        order = torch.argsort(s, descending=True, stable=True)
        return {"masks": torch.stack(fused_masks)[order], "scores": s[order], "labels": labels[keep][order]}

    def loss(self, images: Tensor, targets: Sequence[dict[str, Tensor]],
             class_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.member.loss(images, targets, class_names)

    def save_pretrained(self, path: str | Path) -> Path:
        """The member in ``member/`` and ``teacher.yaml`` (a tta config over it)."""
        return write_teacher_yaml(path, {"type": "tta", "member": save_member(self.member, Path(path) / "member"),
                                         "flips": self.flips, "mask_nms_iou": self.mask_nms_iou,
                                         "max_detections": self.max_detections, "class_names": self.class_names})


def with_tta(teacher: Teacher, info: dict[str, Any], flips: Sequence[str]) -> tuple[TTATeacher, dict[str, Any]]:
    """Wrap a loaded teacher (``info`` as from :func:`castseg.pseudo_labels.load_teacher`) in
    :class:`TTATeacher`; its fingerprint changes with the views, so a cache made without them
    (or with others) is not mistaken for this teacher's."""
    config = {"type": "tta", "flips": list(flips), "member": info.get("config")}
    sha = hashlib.sha256((str(info.get("sha256")) + json.dumps(config, sort_keys=True, default=str)).encode())
    return TTATeacher(teacher, flips), {**info, "config": config, "sha256": sha.hexdigest()}
