"""Model → COCO results → mask AP on a validation json (training-time validation and ``eval``).

:func:`predict_dataset` runs the model over images in batches (no grad, eval mode, the model's
training flag restored afterwards) and turns each image's outputs into COCO result records
right away — the binary masks of one image are RLE-encoded before the next is post-processed,
so memory holds one image's ``topk × H0 × W0`` masks at most, not the whole split's.
:func:`evaluate_model` scores those records with :func:`castseg.eval.coco_eval.evaluate_coco`;
:func:`make_evaluator` wraps it as the ``evaluate_fn`` of :class:`castseg.engine.Trainer`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from castseg.data.dataset import UnlabeledImageDataset
from castseg.data.transforms import Resize
from castseg.eval.coco_eval import evaluate_coco, load_gt
from castseg.eval.results import write_results
from castseg.models.inference import outputs_to_instances, resize_masks, to_coco_results


class _EvalCollate:
    """Samples → ``{"images": [B,3,H,W] zero-padded bottom/right, "sizes": B (h, w) after the
    optional resize, "orig_sizes": B (H0, W0), "image_ids": B}``. A class, not a closure, so
    DataLoader workers can pickle it."""

    def __init__(self, min_size: int | None, max_size: int | None):
        self.resize = Resize(min_size, max_size) if (min_size or max_size) else None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images, orig = [], []
        for s in samples:
            img = s["image"]
            orig.append(tuple(int(v) for v in s.get("orig_size", img.shape[-2:])))
            if self.resize is not None:
                img = self.resize({"image": img})["image"]
            images.append(img)
        H = max(i.shape[-2] for i in images)
        W = max(i.shape[-1] for i in images)
        batch = images[0].new_zeros((len(images), 3, H, W))
        for b, img in enumerate(images):
            batch[b, :, : img.shape[-2], : img.shape[-1]] = img
        return {"images": batch, "sizes": [tuple(i.shape[-2:]) for i in images], "orig_sizes": orig,
                "image_ids": [int(s["image_id"]) for s in samples]}


def _autocast(amp: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None or (dtype is torch.float16 and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# images [B,3,H,W] (zero-padded), their sizes (h, w) before padding and original sizes (H0, W0)
# -> per image {"masks" bool [K,H0,W0], "scores" [K], "labels" int64 [K]}
InstancesFn = Callable[[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]], list[dict[str, torch.Tensor]]]


def network_instances(model: nn.Module, topk: int = 100, mask_threshold: float = 0.5, score_threshold: float = 0.0,
                      chunk_size: int = 32, amp: str = "none") -> InstancesFn:
    """A student-architecture network (``pred_logits`` ``[B,Q,C+1]``, ``pred_masks`` ``[B,Q,h,w]``
    at ``1/mask_stride`` of its padded input) as an :data:`InstancesFn`: one forward per batch,
    each image's padding cropped and its masks resized to the original size in one step."""
    def run(images, sizes, orig_sizes):
        dev = next(model.parameters()).device
        with _autocast(amp, dev):
            out = model(images.to(dev, non_blocking=True))
        return outputs_to_instances(out, sizes, orig_sizes, topk=topk, mask_threshold=mask_threshold,
                                    score_threshold=score_threshold, chunk_size=chunk_size)

    return run


def predictor_instances(predict: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]) -> InstancesFn:
    """Any ``predict(images [B,3,H,W]) -> instances at the input size`` (a teacher's
    ``predict``, a loaded :class:`~castseg.predictor.Model`, a classical method) as an
    :data:`InstancesFn`: masks cropped to each image and resized to its original size."""
    def run(images, sizes, orig_sizes):
        out = []
        for r, (h, w), orig in zip(predict(images), sizes, orig_sizes):
            out.append({"masks": resize_masks(r["masks"][:, :h, :w].cpu(), orig), "scores": r["scores"].cpu(),
                        "labels": r["labels"].cpu()})
        return out

    return run


@torch.no_grad()
def predict_dataset(model: nn.Module | InstancesFn, data: Dataset | str | Path, batch_size: int = 1,
                    device: str | torch.device | None = None, topk: int = 100, max_size: int | None = None,
                    min_size: int | None = None, cat_ids: Sequence[int] | None = None,
                    images_root: str | Path | None = None, mask_threshold: float = 0.5,
                    score_threshold: float = 0.0, chunk_size: int = 32, num_workers: int = 0,
                    amp: str = "none") -> list[dict[str, Any]]:
    """COCO result records on every image of ``data`` — the one predict → COCO loop of castseg.

    Args:
        model: a network (see :func:`network_instances`; ``topk``, thresholds, ``amp`` apply
            to it; it runs in eval mode, its training flag restored afterwards) or an
            :data:`InstancesFn` (e.g. :func:`predictor_instances` of a teacher).
        data: a COCO json (its images; annotations unused) or a dataset whose items hold
            ``"image"`` ``[3,H,W]``, ``"image_id"`` and optionally ``"orig_size"``.
        device: where a network runs; None = where its parameters are. It is moved there.
        min_size / max_size: resize (shorter side to ``min_size``, longer side at most
            ``max_size``) before the model; masks come back at the original size.
        cat_ids: COCO category id per class index; default: the json's / dataset's categories
            in file order (the order training datasets number classes in).

    Returns:
        Records ``{"image_id", "category_id", "score", "segmentation" (RLE), "bbox"}``.
    """
    if isinstance(data, (str, Path)):
        dataset: Dataset = UnlabeledImageDataset(data, images_root, strong_view=False)
        if cat_ids is None:
            cat_ids = [c["id"] for c in load_gt(data, iou_type=None, require_annotations=False).categories]
    else:
        dataset = data
        cat_ids = cat_ids if cat_ids is not None else getattr(data, "cat_ids", None)
    if cat_ids is None:
        raise ValueError("predict_dataset: pass cat_ids (the dataset has no 'cat_ids')")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_EvalCollate(min_size, max_size))
    with _eval_mode(model, device):
        fn = model if not isinstance(model, nn.Module) else network_instances(
            model, topk=topk, mask_threshold=mask_threshold, score_threshold=score_threshold, chunk_size=chunk_size,
            amp=amp)
        records: list[dict[str, Any]] = []
        for batch in loader:
            for image_id, inst in zip(batch["image_ids"], fn(batch["images"], batch["sizes"], batch["orig_sizes"])):
                records += to_coco_results(inst, image_id, cat_ids)
    return records


@contextlib.contextmanager
def _eval_mode(model: Any, device: str | torch.device | None):
    """A network in eval mode on ``device`` for the block, its training flag restored after."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    if device is not None:
        model.to(torch.device(device))
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate_model(model: nn.Module | InstancesFn, val_json: str | Path, max_dets: int = 100,
                   iou_type: str = "segm", images_root: str | Path | None = None,
                   results_path: str | Path | None = None, **predict_kwargs: Any) -> dict[str, float]:
    """Mask (or box) AP of ``model`` (a network or an :data:`InstancesFn`) on ``val_json``:
    ``{AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl, num_predictions}`` as
    fractions (-1 where COCO leaves one undefined).

    ``predict_kwargs`` go to :func:`predict_dataset` (batch_size, device, topk, max_size, ...);
    ``results_path`` also saves the records as a COCO results json.
    """
    gt = load_gt(val_json, iou_type)
    records = predict_dataset(model, val_json, images_root=images_root,
                              cat_ids=[c["id"] for c in gt.categories], **predict_kwargs)
    if results_path is not None:
        write_results(records, results_path)
    stats = evaluate_coco(gt, records, iou_type, max_dets=max_dets)
    return {**stats, "num_predictions": float(len(records))}


def make_evaluator(val_json: str | Path, **kwargs: Any) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate_fn`` for :class:`castseg.engine.Trainer`: ``model -> evaluate_model(model, val_json, **kwargs)``
    (keyword arguments as for :func:`evaluate_model`, e.g. from an ``eval:`` config section)."""
    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_model(model, val_json, **kwargs)

    return evaluate
