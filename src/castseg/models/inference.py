"""Instance inference: per-query class and mask logits → scored binary instance masks.

Mask2Former's instance recipe: the top-k (query, class) pairs by class probability (no-object
excluded), each scored ``p(class) × mean mask probability inside its binarised mask``.

Memory: only the selected queries are upsampled, ``chunk_size`` at a time, so the float
working set is ``chunk_size × (padded + original)`` pixels rather than ``Q × H0 × W0``
(upsampling every query mask at once is a known out-of-memory cause on large images); the
result itself is kept as ``bool``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from castseg.eval.results import instances_to_results


def _masks_at_output(logits: Tensor, image_size: tuple[int, int], output_size: tuple[int, int],
                     padded_size: tuple[int, int]) -> Tensor:
    """Mask probabilities ``[c, H0, W0]`` from mask logits ``[c, h, w]``: upsample to the padded
    input, crop its valid ``image_size`` region, resize to the original ``output_size``."""
    x = F.interpolate(logits[:, None].float(), size=padded_size, mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[:, 0].sigmoid()


@torch.no_grad()
def postprocess_instances(pred_logits: Tensor, pred_masks: Tensor, image_sizes: Sequence[tuple[int, int]],
                          output_sizes: Sequence[tuple[int, int]], topk: int = 100, mask_threshold: float = 0.5,
                          score_threshold: float = 0.0, chunk_size: int = 32,
                          mask_stride: int = 4) -> list[dict[str, Tensor]]:
    """Turn model outputs into instances per image.

    Args:
        pred_logits: ``[B, Q, C+1]`` class logits (last = no-object).
        pred_masks: ``[B, Q, h, w]`` mask logits at ``1/mask_stride`` of the padded input.
        image_sizes: B ``(H, W)``: the valid (unpadded) region of each padded input.
        output_sizes: B ``(H0, W0)``: the original image sizes to return masks at.
        topk: number of (query, class) pairs kept per image, over the flattened ``Q·C``.
        mask_threshold: probability above which a pixel is in the mask.
        score_threshold: instances scoring below it are dropped (default keeps all k).
        chunk_size: queries upsampled at once (bounds peak memory).
        mask_stride: the padded input is ``(h·s, w·s)``.

    Returns:
        B dicts (on the inputs' device), sorted by descending score: ``"masks"`` bool
        ``[K, H0, W0]``, ``"scores"`` float ``[K]``, ``"labels"`` int64 ``[K]`` in ``[0, C)``.
    """
    b, q, c1 = pred_logits.shape
    if pred_masks.shape[:2] != (b, q):
        raise ValueError(f"pred_masks {list(pred_masks.shape)} do not match pred_logits {list(pred_logits.shape)}")
    if len(image_sizes) != b or len(output_sizes) != b:
        raise ValueError(f"need {b} image_sizes and output_sizes, got {len(image_sizes)} and {len(output_sizes)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    num_classes = c1 - 1
    padded = (pred_masks.shape[-2] * mask_stride, pred_masks.shape[-1] * mask_stride)
    results = []
    for i in range(b):
        h0, w0 = (int(v) for v in output_sizes[i])
        prob = pred_logits[i].float().softmax(dim=-1)[:, :num_classes]  # [Q, C]
        k = min(topk, prob.numel())
        cls_score, flat = prob.flatten().topk(k)
        query, label = flat // num_classes, flat % num_classes
        # A query can be picked with several classes: upsample each distinct query once.
        uniq, inverse = torch.unique(query, return_inverse=True)
        masks_u = torch.empty(len(uniq), h0, w0, dtype=torch.bool, device=pred_masks.device)
        mask_score_u = torch.empty(len(uniq), device=pred_masks.device)
        for s in range(0, len(uniq), chunk_size):
            p = _masks_at_output(pred_masks[i, uniq[s:s + chunk_size]], tuple(image_sizes[i]), (h0, w0), padded)
            m = p > mask_threshold
            masks_u[s:s + chunk_size] = m
            mask_score_u[s:s + chunk_size] = (p * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
        scores = cls_score * mask_score_u[inverse]
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[scores[order] >= score_threshold]
        results.append({"masks": masks_u[inverse[order]], "scores": scores[order], "labels": label[order]})
    return results


def outputs_to_instances(outputs: dict[str, Any], image_sizes: Sequence[tuple[int, int]],
                         output_sizes: Sequence[tuple[int, int]], **postprocess: Any) -> list[dict[str, Tensor]]:
    """The one way a student-architecture network's outputs become instances (the student, a
    ``large``-preset teacher, an ONNX file: :class:`~castseg.models.teacher.ModelTeacher`, and
    evaluation through :func:`castseg.evaluate.network_instances`).

    Args:
        outputs: ``{"pred_logits" [B,Q,C+1], "pred_masks" [B,Q,h,w], "mask_stride" (optional, 4)}``.
        image_sizes: B ``(h, w)``: each image's valid region of the padded input.
        output_sizes: B ``(H0, W0)``: the sizes to return masks at.
        postprocess: :func:`postprocess_instances`' options (``topk``, ``score_threshold`` ...).

    Returns:
        B dicts ``{"masks" bool [K,H0,W0], "scores" [K], "labels" int64 [K]}``, one image at a
        time so memory holds one image's upsampled masks.
    """
    stride = int(outputs.get("mask_stride", 4))
    logits, masks = outputs["pred_logits"].float(), outputs["pred_masks"]
    return [postprocess_instances(logits[b: b + 1], masks[b: b + 1].float(), [image_sizes[b]], [output_sizes[b]],
                                  **{"mask_stride": stride, **postprocess})[0]
            for b in range(len(image_sizes))]


def to_coco_results(instances: dict[str, Any], image_id: int, cat_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One image's instances → COCO result records.

    Args:
        instances: ``{"masks": [K, H0, W0], "scores": [K], "labels": [K]}`` (contiguous labels).
        image_id: the COCO image id.
        cat_ids: COCO category id of each contiguous label (``cat_ids[label]``).

    Returns:
        K dicts ``{"image_id", "category_id", "score", "segmentation" (compressed RLE),
        "bbox" [x, y, w, h] of the mask}``.
    """
    labels = np.asarray(instances["labels"].detach().cpu() if isinstance(instances["labels"], Tensor)
                        else instances["labels"]).reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
        raise ValueError(f"labels must be in [0, {len(cat_ids) - 1}] to map to the {len(cat_ids)} category ids")
    categories = np.asarray(cat_ids, dtype=np.int64)[labels.astype(np.int64)]
    # One writer for every predictor: the results format lives in castseg.eval.results.
    return instances_to_results(image_id, instances["masks"], instances["scores"], categories)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Binary masks ``[K,h,w]`` → bool ``[K,H,W]`` (nearest), for predictions made on a resized
    input; ``K = 0`` is fine (interpolate itself rejects an empty channel dimension)."""
    size = (int(size[0]), int(size[1]))
    if len(masks) == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=masks.device)
    if tuple(masks.shape[-2:]) == size:
        return masks.bool()
    return F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5
