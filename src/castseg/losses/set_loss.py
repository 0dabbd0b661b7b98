"""Mask2Former set loss, used for both L_sup (ground truth) and L_semi (teacher pseudo-labels).

For every decoder layer (final output and each ``aux_outputs`` entry, i.e. deep supervision),
queries are Hungarian-matched to targets, then:

* ``loss_ce``: cross-entropy over C+1 classes for all queries; unmatched queries target the
  no-object class, whose class weight is ``no_object_weight`` (0.1); weighted mean.
* ``loss_mask``: sigmoid BCE of matched masks, averaged over importance-sampled points.
* ``loss_dice``: soft Dice on the same points.

Mask terms are summed over matched instances and divided by the number of target instances
(averaged over DDP ranks, at least 1), as in Mask2Former.

Per-instance ``weights`` (e.g. teacher scores for pseudo-labels) multiply the instance's CE,
mask and Dice terms. A weight of 0 means "ignore": the instance leaves the mask-term
normaliser and its matched query leaves the CE (it is neither pushed towards that class nor
towards no-object), which is how uncertain pseudo-labels should be treated. Weights must be ≥ 0.

A ``valid`` region ``[H, W]`` per image (False on padding) restricts points to the region's
bounding box, gives points outside the region weight 0 and keeps them out of importance
sampling.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from castseg.losses.matcher import HungarianMatcher
from castseg.losses.point_sampling import point_sample, region_bounds, uncertain_points

TERMS = ("loss_ce", "loss_mask", "loss_dice")


def _instance_weights(target: dict[str, Any], device: torch.device) -> Tensor:
    n = len(target["labels"])
    w = target.get("weights")
    if w is None:
        return torch.ones(n, device=device)
    w = torch.as_tensor(w, dtype=torch.float32, device=device).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"target has {n} labels but {w.numel()} weights")
    return w


class SetLoss(nn.Module):
    """Hungarian-matched class + mask + Dice loss with deep supervision.

    Args:
        num_classes: C (foreground classes); logits have C+1 entries, the last is no-object.
        matcher: the :class:`HungarianMatcher` (a default one when ``None``).
        weight_class, weight_mask, weight_dice: weights of the terms in ``loss``.
        no_object_weight: CE class weight of the no-object class.
        num_points: points per matched mask for the mask terms.
        oversample_ratio, importance_sample_ratio: Mask2Former's k and β.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, weight_class: float = 2.0,
                 weight_mask: float = 5.0, weight_dice: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError("need oversample_ratio ≥ 1 and 0 ≤ importance_sample_ratio ≤ 1")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = {"loss_ce": weight_class, "loss_mask": weight_mask, "loss_dice": weight_dice}
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)

    def _check(self, outputs: dict[str, Any], targets: Sequence[dict[str, Any]]) -> None:
        b, _, c1 = outputs["pred_logits"].shape
        if c1 != self.num_classes + 1:
            raise ValueError(f"pred_logits has {c1} classes; expected num_classes + 1 = {self.num_classes + 1}")
        if len(targets) != b:
            raise ValueError(f"got {len(targets)} targets for a batch of {b}")
        for i, t in enumerate(targets):
            n = len(t["labels"])
            if t["masks"].dim() != 3 or t["masks"].shape[0] != n:
                raise ValueError(f"target {i}: masks {list(t['masks'].shape)} do not match {n} labels")
        labels = [t["labels"] for t in targets if len(t["labels"])]
        if labels:  # one host sync for the batch, not two per image
            lo, hi = torch.aminmax(torch.cat([x.to(labels[0].device).long() for x in labels]))
            if int(lo) < 0 or int(hi) >= self.num_classes:
                bad = next(i for i, t in enumerate(targets) if len(t["labels"]) and (
                    int(t["labels"].min()) < 0 or int(t["labels"].max()) >= self.num_classes))
                raise ValueError(f"target {bad}: labels must be in [0, {self.num_classes - 1}]")

    def num_masks(self, targets: Sequence[dict[str, Any]], device: torch.device) -> Tensor:
        """Normaliser of the mask terms: instances with weight > 0, mean over DDP ranks, ≥ 1."""
        total = torch.zeros((), dtype=torch.float32, device=device)
        for t in targets:  # summed on the device: no host sync per target
            total = total + (_instance_weights(t, device) > 0).sum()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        return total.clamp(min=1.0)

    def loss_classes(self, logits: Tensor, targets: Sequence[dict[str, Any]],
                     indices: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Weighted CE of ``logits [B, Q, C+1]``; matched queries take their target's label and
        weight, the others no-object (weight 1)."""
        b, q, _ = logits.shape
        dev = logits.device
        target_cls = torch.full((b, q), self.num_classes, dtype=torch.int64, device=dev)
        inst_w = torch.ones(b, q, device=dev)
        for i, (qi, ti) in enumerate(indices):
            if len(qi):
                qi, ti = qi.to(dev), ti.to(dev)
                target_cls[i, qi] = targets[i]["labels"].to(dev).long()[ti]
                inst_w[i, qi] = _instance_weights(targets[i], dev)[ti]
        ce = F.cross_entropy(logits.float().transpose(1, 2), target_cls, reduction="none")  # [B, Q]
        cw = self.class_weight.to(dev)[target_cls]
        # Weighted mean as in F.cross_entropy(weight=...), with zero-weight ("ignored") queries
        # left out of the denominator too.
        return (ce * cw * inst_w).sum() / (cw * (inst_w > 0)).sum().clamp(min=1e-6)

    def loss_masks(self, pred_masks: Tensor, targets: Sequence[dict[str, Any]],
                   indices: list[tuple[Tensor, Tensor]], num_masks: Tensor,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and Dice of matched masks.

        Args:
            pred_masks: ``[B, Q, h, w]`` mask logits.
            targets: as in :meth:`forward`.
            indices: the matcher's pairs (ordered by target index).
            num_masks: normaliser from :meth:`num_masks`.

        Returns:
            ``(loss_mask, loss_dice)`` scalars.
        """
        dev = pred_masks.device
        img, qs, ts, ws, los, his = [], [], [], [], [], []
        bounds = [t.get("bounds") or region_bounds(t.get("valid")) for t in targets]
        regions = [r for _, _, r in bounds]  # None where all points in the box are valid
        for i, (qi, ti) in enumerate(indices):
            w = _instance_weights(targets[i], dev)[ti.to(dev)] if len(ti) else torch.empty(0, device=dev)
            keep = (w > 0).cpu()  # zero-weight instances cost nothing and draw no random points
            qi, ti, w = qi[keep], ti[keep], w[keep.to(dev)]
            lo, hi, _ = bounds[i]
            img.append(torch.full((len(qi),), i, dtype=torch.int64))
            qs.append(qi)
            ts.append(ti)
            ws.append(w)
            los.append(lo.expand(len(qi), 2))
            his.append(hi.expand(len(qi), 2))
        image_of = torch.cat(img)
        if image_of.numel() == 0:
            zero = pred_masks.sum() * 0.0  # keeps the graph connected for DDP
            return zero, zero
        src = pred_masks[image_of.to(dev), torch.cat(qs).to(dev)]  # [M, h, w]
        pts = uncertain_points(src, self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                               torch.cat(los), torch.cat(his), regions, image_of, generator)  # image_of on the host: no sync
        pred = point_sample(src, pts)  # [M, P], carries the gradient
        tgt_parts, pw_parts = [], []
        for i, t in enumerate(ts):
            if len(t) == 0:
                continue
            rows = torch.nonzero(image_of == i).flatten().to(dev)
            all_masks = targets[i]["masks"]
            masks = all_masks[t.to(all_masks.device)].to(dev)  # move only the matched masks
            tgt_parts.append(point_sample(masks, pts[rows]))
            if regions[i] is None:
                pw_parts.append(torch.ones(len(rows), pts.shape[1], device=dev))
            else:
                pw_parts.append(point_sample(regions[i].to(dev)[None], pts[rows], mode="nearest"))
        tgt, pw = torch.cat(tgt_parts), torch.cat(pw_parts)
        inst_w = torch.cat(ws)
        bce = F.binary_cross_entropy_with_logits(pred, tgt, reduction="none")
        bce = (bce * pw).sum(dim=1) / pw.sum(dim=1).clamp(min=1.0)
        s = pred.sigmoid() * pw
        dice = 1.0 - (2.0 * (s * tgt).sum(dim=1) + 1.0) / (s.sum(dim=1) + (tgt * pw).sum(dim=1) + 1.0)
        return (bce * inst_w).sum() / num_masks, (dice * inst_w).sum() / num_masks

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Any]],
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute the set loss.

        Args:
            outputs: ``{"pred_logits": [B, Q, C+1], "pred_masks": [B, Q, h, w],
                "aux_outputs": optional list of the same two keys}``.
            targets: B dicts: ``"labels"`` int64 ``[N]`` in ``[0, C)``, ``"masks"`` ``[N, H, W]``
                bool/float (any resolution: compared in normalised coordinates), optional
                ``"weights"`` float ``[N]`` ≥ 0, optional ``"valid"`` bool ``[H, W]``.
            generator: optional RNG (on the outputs' device) making point draws reproducible.

        Returns:
            ``loss`` (weighted total over all layers, differentiable); per layer ``loss_ce``,
            ``loss_mask``, ``loss_dice`` (final) and ``loss_ce_aux{i}`` … (aux layer i); and
            ``loss_ce_sum``, ``loss_mask_sum``, ``loss_dice_sum`` (unweighted sums over layers).
        """
        self._check(outputs, targets)
        # each image's point-drawing region once per step, not once per layer and use (each
        # region_bounds reads the valid map back to the host)
        targets = [{**t, "bounds": t.get("bounds") or region_bounds(t.get("valid"))} for t in targets]
        layers = [outputs] + list(outputs.get("aux_outputs") or [])
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        losses: dict[str, Tensor] = {}
        sums = {k: outputs["pred_logits"].new_zeros((), dtype=torch.float32) for k in TERMS}
        for li, out in enumerate(layers):
            suffix = "" if li == 0 else f"_aux{li - 1}"
            indices = self.matcher(out, targets, generator)
            terms = {"loss_ce": self.loss_classes(out["pred_logits"], targets, indices)}
            terms["loss_mask"], terms["loss_dice"] = self.loss_masks(out["pred_masks"], targets, indices,
                                                                     num_masks, generator)
            for k, v in terms.items():
                losses[k + suffix] = v
                sums[k] = sums[k] + v
        for k in TERMS:
            losses[k + "_sum"] = sums[k]
        losses["loss"] = sum(self.weights[k] * sums[k] for k in TERMS)
        return losses
