"""CAST's one objective (METHOD.md, "One objective, three stages"):

    J(θ; D_l, D_u; λ_semi, λ_pxl) = L_sup(D_l) + λ_semi · L_semi(D_u) + λ_pxl · L_pxl(D_l ∪ D_u)

Every stage is this objective with other weights or batches: teacher adaptation (a) labeled
only with λ_semi = 0, (c) and distillation both batches, refinement labeled only with λ_pxl = 0.

L_sup and L_semi are the same Mask2Former :class:`~castseg.losses.set_loss.SetLoss`, against
ground truth and against (already score-filtered, binarised) teacher pseudo-labels, whose
optional per-instance ``weights`` it honours. L_pxl is
:class:`~castseg.losses.pixel_contrastive.PixelContrastiveLoss` over the pixels of both batches.

Cost: one gradient-carrying forward per step over the labeled and unlabeled weak images together
(with embeddings only when L_pxl is on) feeds both set losses and L_pxl; the strong views cost one
more forward without gradient, only when L_pxl is on. One forward per step is what
DistributedDataParallel needs to reduce gradients during backward. A term whose λ is 0 is not
computed at all (and the unlabeled batch is not even forwarded when neither L_semi nor L_pxl
needs it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from castseg.losses.set_loss import SetLoss


def pad_to(x: Tensor, h: int, w: int, value: Any = 0) -> Tensor:
    """Pad the last two dims of ``x`` bottom/right to ``(h, w)``."""
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), value=value)


def _at_grid(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """``[B,H,W]`` map → ``[B,h,w]``: the value at each grid cell's centre pixel (nearest), so
    a cell takes the instance / validity of the pixel its embedding is centred on."""
    H, W = x.shape[-2:]
    rows = ((torch.arange(hw[0], device=x.device) + 0.5) * H / hw[0]).long()
    cols = ((torch.arange(hw[1], device=x.device) + 0.5) * W / hw[1]).long()
    return x[:, rows][:, :, cols]


def _predict(model: nn.Module, batches: list[dict[str, Any]], use_pxl: bool,
             device: torch.device) -> tuple[dict[str, Any], Tensor | None]:
    """The model's outputs on the batches' images stacked in order, and (with L_pxl) the
    no-grad embeddings of their strong views [ΣB,D,Hp/e,Wp/e] (else None).

    One gradient-carrying forward over all batches, so DDP sees one forward per step (and
    reduces gradients while backward runs); per-image results equal separate forwards."""
    pred_all = model(stack_padded([b["images"].to(device) for b in batches]), return_embeddings=use_pxl)
    if not use_pxl:
        return pred_all, None
    if any(b.get("images_strong") is None for b in batches):
        raise ValueError("L_pxl needs 'images_strong' in the batch (build the dataset with strong_view=True)")
    with torch.no_grad():
        strong = model(stack_padded([b["images_strong"].to(device) for b in batches]),
                       return_embeddings=True)["embeddings"]
    return pred_all, strong


def stack_padded(images: list[Tensor]) -> Tensor:
    """``[B_i,3,H_i,W_i]`` batches → one ``[ΣB_i,3,H,W]`` batch, zero-padded bottom/right (the
    collate's own padding convention, so each image keeps its pixels and its valid map)."""
    if len(images) == 1:
        return images[0]
    h, w = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    return torch.cat([pad_to(x, h, w) for x in images])


def _slice_outputs(pred: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """The model outputs of images ``start:stop`` of a batch (tensors and ``aux_outputs``)."""
    out = {}
    for k, v in pred.items():
        if torch.is_tensor(v) and v.dim() > 0:
            out[k] = v[start:stop]
        elif k == "aux_outputs":
            out[k] = [_slice_outputs(a, start, stop) for a in v]
        else:
            out[k] = v
    return out


def build_objective(num_classes: int, loss: Any, lambda_semi: float, lambda_pxl: float) -> "CastObjective":
    """J with a run's ``loss`` section (:class:`~castseg.config_sections.LossConfig`) and the
    stage's λs."""
    from castseg.losses import HungarianMatcher
    from castseg.losses.pixel_contrastive import PixelContrastiveLoss

    pixel = PixelContrastiveLoss(temperature=loss.temperature, num_negatives=loss.num_negatives,
                                 sampler=loss.sampler, max_anchors=loss.max_anchors) if lambda_pxl > 0 else None
    return CastObjective(SetLoss(num_classes, HungarianMatcher(num_points=loss.num_points), num_points=loss.num_points),
                         pixel, lambda_semi=lambda_semi, lambda_pxl=lambda_pxl)


class CastObjective(nn.Module):
    """J = L_sup + λ_semi · L_semi + λ_pxl · L_pxl.

    Args:
        set_loss: the set loss used for both L_sup and L_semi (C classes).
        pixel_loss: L_pxl; ``None`` switches it off like ``lambda_pxl=0``.
        lambda_semi, lambda_pxl: the weights (METHOD.md defaults 1 and 0.1).
        fnr_from_pseudo_labels: count the sampler's false negatives against pseudo-label
            instances on unlabeled images too (default: ground truth only, as in the paper;
            unlabeled pixels are then "unknown" for the monitor).
    """

    def __init__(self, set_loss: SetLoss, pixel_loss: nn.Module | None = None, lambda_semi: float = 1.0,
                 lambda_pxl: float = 0.1, fnr_from_pseudo_labels: bool = False):
        super().__init__()
        if lambda_semi < 0 or lambda_pxl < 0:
            raise ValueError(f"λ must be ≥ 0, got lambda_semi={lambda_semi}, lambda_pxl={lambda_pxl}")
        self.set_loss, self.pixel_loss = set_loss, pixel_loss
        self.lambda_semi, self.lambda_pxl = float(lambda_semi), float(lambda_pxl)
        self.fnr_from_pseudo_labels = fnr_from_pseudo_labels

    @property
    def uses_pxl(self) -> bool:
        return self.pixel_loss is not None and self.lambda_pxl > 0

    def forward(self, model: nn.Module, labeled_batch: dict[str, Any] | None = None,
                unlabeled_batch: dict[str, Any] | None = None, step: int | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute J on one labeled and/or one unlabeled batch.

        Args:
            model: ``model(images [B,3,H,W], return_embeddings=bool)`` → the
                :class:`~castseg.models.student.StudentModel` output dict (``pred_logits``
                [B,Q,C+1], ``pred_masks`` [B,Q,Hp/4,Wp/4], ``aux_outputs``, ``padded_size``
                (Hp, Wp), ``embeddings`` [B,D,Hp/e,Wp/e] when asked).
            labeled_batch, unlabeled_batch: :func:`~castseg.data.dataset.collate_instances`
                dicts: ``images`` [B,3,H,W], ``valid`` bool [B,H,W], ``images_strong``
                [B,3,H,W] (needed when L_pxl is on), ``targets`` B dicts with ``masks`` bool
                [N,H,W], ``labels`` int64 [N], optional ``weights`` [N] and ``ignore`` [H,W]
                (crowd pixels: neither object nor background for any loss). The unlabeled
                targets are pseudo-labels (e.g. from
                :class:`~castseg.pseudo_labels.PseudoLabeledDataset`).
            step: training step (annealed temperature of L_pxl).
            generator: optional RNG (on the model's device) for point and pixel draws.

        Returns:
            ``loss`` (differentiable) = ``loss_sup`` + λ_semi·``loss_semi`` + λ_pxl·``loss_pxl``
            (a skipped or absent term is a detached 0); detached final-layer terms
            ``sup_loss_ce/_mask/_dice`` and ``semi_…``; L_pxl's monitors as detached scalars
            ``pxl_margin``, ``pxl_fnr``, … (NaN when not computed).
        """
        if labeled_batch is None and unlabeled_batch is None:
            raise ValueError("CastObjective needs a labeled and/or an unlabeled batch")
        use_pxl = self.uses_pxl
        use_unlabeled = unlabeled_batch is not None and (self.lambda_semi > 0 or use_pxl)
        if labeled_batch is None and not use_unlabeled:
            raise ValueError("nothing to compute: no labeled batch, and λ_semi = λ_pxl = 0")
        device = next(model.parameters()).device
        zero = torch.zeros((), device=device)
        out: dict[str, Tensor] = {"loss_sup": zero, "loss_semi": zero, "loss_pxl": zero}
        parts = [(name, batch, use_set) for name, batch, use_set in
                 (("sup", labeled_batch, True), ("semi", unlabeled_batch if use_unlabeled else None,
                                                 self.lambda_semi > 0)) if batch is not None]
        pred_all, strong_all = _predict(model, [b for _, b, _ in parts], use_pxl, device)
        pxl_parts: list[dict[str, Tensor]] = []
        start = 0
        for name, batch, use_set in parts:
            n = len(batch["images"])
            pred = _slice_outputs(pred_all, start, start + n)
            targets, valid, ids = self._targets(batch, pred["padded_size"], device,
                                                with_ids=use_pxl and (name == "sup" or self.fnr_from_pseudo_labels))
            if use_set:
                terms = self.set_loss(pred, targets, generator=generator)
                out[f"loss_{name}"] = terms["loss"]
                out.update({f"{name}_{k}": terms[k].detach() for k in ("loss_ce", "loss_mask", "loss_dice")})
            if use_pxl:
                pxl_parts.append(self._pixel_inputs(pred, strong_all[start:start + n], valid, ids, device))
            start += n
        if use_pxl:
            out["loss_pxl"], stats = self._pixel_loss(pxl_parts, step, generator)
        else:
            stats = {}
        for k in ("margin", "fnr"):
            stats.setdefault(k, torch.tensor(math.nan, device=device))
        out.update({f"pxl_{k}": torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in stats.items()})
        out["loss"] = out["loss_sup"] + self.lambda_semi * out["loss_semi"] + self.lambda_pxl * out["loss_pxl"]
        return out

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _targets(batch: dict[str, Any], padded: tuple[int, int], device: torch.device, with_ids: bool
                 ) -> tuple[list[dict[str, Tensor]], Tensor, Tensor | None]:
        """Set-loss targets on the model's padded frame, the valid map ``[B,Hp,Wp]`` and, with
        ``with_ids``, instance ids ``[B,Hp,Wp]`` (-1 = background / unknown).

        Predicted masks cover the model's padded input (Hp, Wp ≥ H, W); the set loss compares
        masks in normalised coordinates, so targets must cover the same frame, else they
        would be stretched over the padding."""
        Hp, Wp = (int(v) for v in padded)
        valid = batch["valid"].to(device)
        targets, valids, ids = [], [], []
        for i, t in enumerate(batch["targets"]):
            v = valid[i]
            if t.get("ignore") is not None:
                v = v & ~t["ignore"].to(device)  # crowd pixels count as neither object nor background
            v = pad_to(v, Hp, Wp, False)
            masks = pad_to(t["masks"].to(device), Hp, Wp, False)
            tgt = {"labels": t["labels"].to(device), "masks": masks, "valid": v}
            if t.get("weights") is not None:
                tgt["weights"] = torch.as_tensor(t["weights"], dtype=torch.float32, device=device)
            targets.append(tgt)
            valids.append(v)
            if with_ids:
                idmap = torch.full((Hp, Wp), -1, dtype=torch.int64, device=device)
                for k in range(len(masks)):  # overlaps: the later instance wins (monitoring only)
                    idmap[masks[k]] = k
                ids.append(idmap)
        return targets, torch.stack(valids), (torch.stack(ids) if with_ids else None)

    @staticmethod
    def _pixel_inputs(pred: dict[str, Any], z_strong: Tensor, valid: Tensor, ids: Tensor | None,
                      device: torch.device) -> dict[str, Tensor]:
        """L_pxl inputs of one batch, all on the embedding grid ``[B,h,w]``: z^w (with grad),
        z^s (the strong view's, no grad), the weak forward's logits (the loss detaches them for
        its sampler), valid pixels and instance ids (-1 unknown)."""
        z_weak = pred["embeddings"]
        hw = tuple(z_weak.shape[-2:])
        n = len(z_weak)
        return {"z_weak": z_weak, "z_strong": z_strong, "mask_logits": pred["pred_masks"],
                "class_logits": pred["pred_logits"], "valid": _at_grid(valid, hw),
                "instance_ids": _at_grid(ids, hw) if ids is not None else
                torch.full((n, *hw), -1, dtype=torch.int64, device=device)}

    def _pixel_loss(self, parts: list[dict[str, Tensor]], step: int | None, generator: torch.Generator | None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L_pxl over labeled ∪ unlabeled. Batches with the same grids are concatenated, so one
        negative pool spans both (METHOD.md: a pool of the whole batch); otherwise each is
        scored alone and the losses (and monitors) are averaged weighted by image count."""
        same = all(p["z_weak"].shape[1:] == parts[0]["z_weak"].shape[1:] and
                   p["mask_logits"].shape[1:] == parts[0]["mask_logits"].shape[1:] for p in parts)
        if same and len(parts) > 1:
            parts = [{k: torch.cat([p[k] for p in parts]) for k in parts[0]}]
        losses, stats, sizes = [], [], []
        for p in parts:
            losses.append(self.pixel_loss(p["z_weak"], p["z_strong"], p["mask_logits"], p["class_logits"],
                                          instance_ids=p["instance_ids"], valid=p["valid"], step=step,
                                          generator=generator))
            stats.append(dict(getattr(self.pixel_loss, "last_stats_tensors", {}) or {}))
            sizes.append(len(p["z_weak"]))
        if len(parts) == 1:
            return losses[0], stats[0]
        total = sum(sizes)
        loss = sum(part * (n / total) for part, n in zip(losses, sizes))
        merged = {}
        for k in set().union(*stats):  # image-weighted mean of the monitors that are not NaN (no host sync)
            vals = torch.stack([s[k] for s in stats if k in s])
            n = torch.tensor([float(m) for s, m in zip(stats, sizes) if k in s], device=vals.device)
            n = n * ~vals.isnan()
            merged[k] = torch.where(n.sum() > 0, (vals.nan_to_num() * n).sum() / n.sum().clamp(min=1), vals.sum() * math.nan)
        return loss, merged
