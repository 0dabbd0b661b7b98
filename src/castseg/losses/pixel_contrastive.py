"""CAST's instance-aware pixel-wise contrastive loss L_pxl and its debiased negative sampler.

Spec: METHOD.md, "The instance-aware pixel-wise contrastive loss". Per anchor pixel (b,p):

    L = -1/A * sum_(b,p) log( exp(s+) / (exp(s+) + sum_r exp(s-_r)) ),
    s+ = <z^w(b,p), z^s(b,p)> / T,   s-_r = <z^w(b,p), z(b',q)_r> / T,

with the R negatives (b',q) drawn from a pool of pixels of the whole batch with probability
proportional to s_deb((b,p),(b',q)) = max(0, 1 - <y~(b,p), y~(b',q)>), where y~ is the
L2-normalised sampler feature built from the model's own detached predictions:
P_m = softmax_K(mask logits) per pixel, P_c = softmax_(C+1)(class logits) per query,
F_c = sum_k P_m P_c, and y = [P_m || F_c] (``fused``), P_m (``mask``) or F_c (``class``);
``uniform`` gives every pool pixel the same weight.

Cost is bounded: anchors are subsampled to ``max_anchors`` and the pool to ``max_pool``, so
the largest tensors are ``[A, P]`` (A anchors x P pool pixels), never ``[N, N]`` over all
pixels; mask logits are resampled only at the A + P selected pixels, never to the full grid.
"""

from __future__ import annotations

import time

import torch
from torch import nn
import torch.nn.functional as F

SAMPLERS = ("uniform", "mask", "class", "fused")


def sampler_features(mask_logits: torch.Tensor, class_logits: torch.Tensor, b_idx: torch.Tensor,
                     p_idx: torch.Tensor, size: tuple[int, int], mode: str = "fused") -> torch.Tensor:
    """L2-normalised sampler features y~ ``[n, F]`` of the pixels (``b_idx``, ``p_idx``).

    ``mask_logits`` ``[B,K,H',W']`` (bilinearly resampled to the embedding grid ``size`` = (H, W),
    align_corners=False, i.e. the same values as ``F.interpolate`` to (H, W), but evaluated
    only at the n requested pixels), ``class_logits`` ``[B,K,C+1]``, ``p_idx`` flat indices
    into H*W. F = K (``mask``), C+1 (``class``) or K+C+1 (``fused``). No gradient.
    """
    H, W = size
    B, K = mask_logits.shape[:2]
    mask_logits = mask_logits.detach().float()
    if mask_logits.shape[-2:] == (H, W):
        m = mask_logits.flatten(2)[b_idx, :, p_idx]                      # [n, K]
    else:
        # Pixel centres in grid_sample's normalised coordinates: with align_corners=False and
        # border padding this reproduces F.interpolate(bilinear, align_corners=False) exactly.
        ys = (p_idx // W).float().add_(0.5).mul_(2.0 / H).sub_(1.0)
        xs = (p_idx % W).float().add_(0.5).mul_(2.0 / W).sub_(1.0)
        m = mask_logits.new_empty(len(p_idx), K)
        for b in range(B):  # B is small; one grid_sample per image keeps memory at O(K * n)
            sel = (b_idx == b).nonzero().squeeze(1)
            if sel.numel():
                grid = torch.stack([xs[sel], ys[sel]], dim=-1).view(1, 1, -1, 2)
                m[sel] = F.grid_sample(mask_logits[b:b + 1], grid, mode="bilinear", padding_mode="border",
                                       align_corners=False)[0, :, 0].T
    p_m = m.softmax(dim=1)                                                # [n, K]
    parts = []
    if mode in ("mask", "fused"):
        parts.append(p_m)
    if mode in ("class", "fused"):
        p_c = class_logits.detach().float().softmax(dim=-1)               # [B, K, C+1]
        f_c = p_m.new_empty(len(p_idx), p_c.shape[-1])
        for b in range(B):
            sel = (b_idx == b).nonzero().squeeze(1)
            f_c[sel] = p_m[sel] @ p_c[b]                                   # F_c = sum_k P_m P_c
        parts.append(f_c)
    if not parts:
        raise ValueError(f"sampler mode {mode!r} has no features; choose one of {SAMPLERS[1:]}")
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def debias_weights(y_anchor: torch.Tensor, y_pool: torch.Tensor) -> torch.Tensor:
    """s_deb ``[A, P]`` = max(0, 1 - <y~_a, y~_q>) for normalised features ``[A,F]``, ``[P,F]``."""
    return (1.0 - y_anchor @ y_pool.T).clamp_(min=0.0)


def sample_negatives(y_anchor: torch.Tensor, y_pool: torch.Tensor, num: int,
                     generator: torch.Generator | None = None, *, forbid: torch.Tensor | None = None,
                     uniform: bool = False, replacement: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num`` negatives per anchor from the pool with probability proportional to s_deb.

    ``y_anchor`` ``[A,F]``, ``y_pool`` ``[P,F]``: normalised sampler features (with
    ``uniform=True`` only their lengths are used: every pool pixel gets weight 1).
    ``forbid`` ``[A,P]`` bool: pairs never drawn (an anchor's own pixel). Returns ``idx``
    ``[A,R]`` long pool indices (in no particular order) and ``ok`` ``[A,R]`` bool,
    R = min(num, P). Without replacement (Gumbel top-k in its exponential-race form), zero-weight
    pixels are never drawn: an anchor with fewer than R positive-weight candidates gets
    ``ok=False`` for the rest, which the loss leaves out of its denominator. With replacement:
    ``torch.multinomial``. Cost: O(A*P) time and memory.
    """
    A, P = len(y_anchor), len(y_pool)
    R = min(int(num), P)
    dev = y_pool.device
    if A == 0 or R == 0:
        e = torch.zeros(A, R, dtype=torch.long, device=dev)
        return e, e.bool()
    if replacement:
        w = torch.ones(A, P, device=dev) if uniform else debias_weights(y_anchor, y_pool)
        if forbid is not None:
            w.masked_fill_(forbid, 0.0)
        has = w.sum(dim=1) > 0
        # multinomial rejects all-zero rows: give them dummy weights, then mask them out
        idx = torch.multinomial(torch.where(has[:, None], w, torch.ones_like(w)), R, replacement=True,
                                generator=generator)
        return idx, has[:, None].expand(A, R).clone()
    # Top-R of w / E with E ~ Exp(1) (= top-R of log w + Gumbel noise, the Gumbel top-k trick)
    # draws R items without replacement with probabilities proportional to w; w = 0 gives key 0,
    # which every positive-weight item beats, so such pixels only fill rows short of
    # candidates and are flagged not ok. One log instead of Gumbel's three.
    u = torch.rand(A, P, generator=generator, device=dev)
    if uniform:
        keys = u.clamp_(min=1e-30)        # all weights 1: u orders the items like 1 / E does
    else:
        keys = debias_weights(y_anchor, y_pool).div_(u.clamp_(1e-30, 1.0 - 1e-7).log_().neg_())
    if forbid is not None:
        keys.masked_fill_(forbid, 0.0)
    vals, idx = keys.topk(R, dim=1, sorted=False)      # order is irrelevant; unsorted is cheaper
    return idx, vals > 0


class PixelContrastiveLoss(nn.Module):
    """L_pxl with the debiased instance-aware sampler (``fused``/``mask``/``class``/``uniform``).

    Negatives' embeddings z(b',q): METHOD.md leaves the view open. Default
    ``negatives_from="strong"``: the stop-grad strong-view embeddings (as in MoCo-style
    stop-grad keys; the strong branch is computed without gradient anyway); ``"weak"`` uses
    the weak-view embeddings, detached. Either way only z^w at the anchors gets gradient.

    Temperature: fixed ``temperature``, or linear anneal ``temperature_schedule`` = (T0, T1)
    over ``total_steps``, driven by the ``step`` passed to :meth:`forward`.

    After each call: ``last_stats`` (floats: margin, pos_sim, neg_sim, temperature,
    num_anchors, pool_size, num_negatives, sampler_ms, and fnr when ``instance_ids`` are given;
    ``last_stats_tensors`` holds them as 0-d tensors on the loss's device, so a training step
    reads them without a host sync). ``sampler_ms`` is there only with ``timed=True``: timing an
    asynchronous GPU needs two device syncs per step, which only benchmarks should pay.
    and ``last_indices`` (``anchors`` [A] and ``pool`` [P] flat indices b*H*W + p,
    ``negatives`` [A,R] indices into the pool, ``ok`` [A,R] bool).
    """

    def __init__(self, temperature: float = 0.1, num_negatives: int = 200, sampler: str = "fused",
                 max_anchors: int = 1024, temperature_schedule: tuple[float, float] | None = None,
                 total_steps: int | None = None, sample_with_replacement: bool = False, max_pool: int = 4096,
                 negatives_from: str = "strong", timed: bool = False):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if negatives_from not in ("strong", "weak"):
            raise ValueError(f"negatives_from must be 'strong' or 'weak', got {negatives_from!r}")
        if temperature_schedule is not None and not total_steps:
            raise ValueError("temperature_schedule needs total_steps > 0")
        if min(max_anchors, max_pool, num_negatives) < 1 or temperature <= 0:
            raise ValueError("max_anchors, max_pool, num_negatives and temperature must be positive")
        self.temperature = float(temperature)
        self.num_negatives = int(num_negatives)
        self.sampler = sampler
        self.max_anchors = int(max_anchors)
        self.max_pool = int(max_pool)
        self.temperature_schedule = tuple(temperature_schedule) if temperature_schedule is not None else None
        self.total_steps = total_steps
        self.sample_with_replacement = bool(sample_with_replacement)
        self.negatives_from = negatives_from
        self.timed = bool(timed)
        self.last_stats_tensors: dict[str, torch.Tensor] = {}
        self.last_indices: dict[str, torch.Tensor] = {}

    @property
    def last_stats(self) -> dict[str, float]:
        """The last call's monitors as floats (reading them syncs with the device)."""
        return {k: float(v) for k, v in self.last_stats_tensors.items()}

    def current_temperature(self, step: int | None = None) -> float:
        """T at ``step``: fixed, or T0 + (T1 - T0) * min(step / total_steps, 1) when annealed."""
        if self.temperature_schedule is None:
            return self.temperature
        if step is None:
            # explicit rather than silently frozen at T0 when a trainer forgets the step
            raise ValueError("an annealed temperature needs the training step: forward(..., step=...)")
        t0, t1 = self.temperature_schedule
        frac = min(max(step / self.total_steps, 0.0), 1.0)
        return float(t0 + (t1 - t0) * frac)

    def _negatives(self, anchors: torch.Tensor, pool: torch.Tensor, mask_logits: torch.Tensor,
                   class_logits: torch.Tensor, size: tuple[int, int],
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The sampler: ``R`` negatives per anchor from the pool, ``(neg [A,R] pool indices,
        ok [A,R] bool, milliseconds)``. No gradient: it only decides which pixels are negatives."""
        dev, HW = anchors.device, size[0] * size[1]
        A, P = len(anchors), len(pool)
        if self.timed:
            _sync(dev)
        t_start = time.perf_counter()
        # fp32 with autocast off: under bf16/fp16 autocast the matmuls would return half
        # precision into fp32 buffers (an index_put dtype error) and coarsen s_deb's weights.
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            if self.sampler == "uniform":
                y_a, y_p = mask_logits.new_empty(A, 0), mask_logits.new_empty(P, 0)
            else:
                both = torch.cat([anchors, pool])
                y = sampler_features(mask_logits, class_logits, both // HW, both % HW, size, self.sampler)
                y_a, y_p = y[:A], y[A:]
            forbid = anchors[:, None] == pool[None, :]         # an anchor is never its own negative
            neg, ok = sample_negatives(y_a, y_p, self.num_negatives, generator, forbid=forbid,
                                       uniform=self.sampler == "uniform", replacement=self.sample_with_replacement)
        if not self.timed:
            return neg, ok, float("nan")
        _sync(dev)
        return neg, ok, (time.perf_counter() - t_start) * 1e3

    def forward(self, z_weak: torch.Tensor, z_strong: torch.Tensor, mask_logits: torch.Tensor,
                class_logits: torch.Tensor, instance_ids: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, step: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar loss. ``z_weak``, ``z_strong`` ``[B,D,H,W]`` (L2-normalised here; only z_weak
        gets gradient), ``mask_logits`` ``[B,K,H',W']``, ``class_logits`` ``[B,K,C+1]``,
        ``instance_ids`` ``[B,H,W]`` int (-1 unknown; monitoring only), ``valid`` ``[B,H,W]``
        bool (False = padding: neither anchor nor negative). Both maps are resized (nearest)
        to (H, W) if needed. ``generator`` seeds the anchor/pool/negative draws."""
        B, _, H, W = z_weak.shape
        if z_strong.shape != z_weak.shape:
            raise ValueError(f"z_strong {tuple(z_strong.shape)} != z_weak {tuple(z_weak.shape)}")
        dev, HW = z_weak.device, H * W
        T = self.current_temperature(step)
        valid_flat = (_resize_nearest(valid, H, W).bool().reshape(-1) if valid is not None
                      else torch.ones(B * HW, dtype=torch.bool, device=dev))
        cand = valid_flat.nonzero().squeeze(1)                  # flat indices b*HW + p
        n = len(cand)
        # uniform subsets (the generator must live on z's device, as for torch.rand)
        anchors = cand[torch.randperm(n, generator=generator, device=dev)[: self.max_anchors]]
        pool = cand[torch.randperm(n, generator=generator, device=dev)[: self.max_pool]]
        A, P = len(anchors), len(pool)

        neg, ok, sampler_ms = self._negatives(anchors, pool, mask_logits, class_logits, (H, W), generator)

        # ---- loss: gather only the selected pixels (no [B*HW, D] copy of the maps) ----
        za = F.normalize(_gather(z_weak, anchors, HW).float(), dim=1)                # [A, D], grad
        zs = F.normalize(_gather(z_strong.detach(), anchors, HW).float(), dim=1)     # [A, D]
        zn_src = z_strong if self.negatives_from == "strong" else z_weak
        zp = F.normalize(_gather(zn_src.detach(), pool, HW).float(), dim=1)          # [P, D]
        pos = (za * zs).sum(dim=1)                                                   # cosines [A]
        neg_cos = (za @ zp.T).gather(1, neg)                   # [A, R]; [A, P] matmul, never [A, R, D]
        logits = torch.cat([pos[:, None], neg_cos.masked_fill(~ok, float("-inf"))], dim=1) / T
        if A == 0:
            loss = z_weak.sum() * 0.0                           # no valid pixel: zero, still in the graph
        else:
            loss = (torch.logsumexp(logits, dim=1) - pos / T).mean()

        with torch.no_grad():  # monitors as device tensors: no .item() (a host sync) per step
            nan = torch.tensor(float("nan"), device=dev)
            pos_sim = pos.mean() if A else nan
            n_ok = ok.sum().float()
            neg_sim = torch.where(n_ok > 0, (neg_cos * ok).sum() / n_ok.clamp(min=1), nan)
            stats = {"margin": (1.0 - neg_sim) - (1.0 - pos_sim), "pos_sim": pos_sim, "neg_sim": neg_sim,
                     "num_negatives": n_ok / A if A else n_ok * 0.0}
            stats.update({k: torch.tensor(float(v), device=dev) for k, v in (
                ("temperature", T), ("num_anchors", A), ("pool_size", P))})
            if self.timed:
                stats["sampler_ms"] = torch.tensor(sampler_ms, device=dev)
            if instance_ids is not None:
                stats["fnr"] = _false_negative_rate(_resize_nearest(instance_ids, H, W).reshape(-1).long(),
                                                    anchors, pool, neg, ok, HW)
        self.last_stats_tensors = {k: v.detach().float().reshape(()) for k, v in stats.items()}
        self.last_indices = {"anchors": anchors, "pool": pool, "negatives": neg, "ok": ok}
        return loss


def _gather(z: torch.Tensor, flat: torch.Tensor, HW: int) -> torch.Tensor:
    """``z`` ``[B,D,H,W]`` at flat pixel indices b*HW + p -> ``[n, D]``."""
    return z.flatten(2)[flat // HW, :, flat % HW]


def _resize_nearest(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``[B,h,w]`` map -> ``[B,H,W]`` (nearest), same dtype; unchanged if already (H, W)."""
    if x.shape[-2:] == (H, W):
        return x
    return F.interpolate(x[:, None].float(), size=(H, W), mode="nearest")[:, 0].to(x.dtype)


def _false_negative_rate(ids: torch.Tensor, anchors: torch.Tensor, pool: torch.Tensor, neg: torch.Tensor,
                         ok: torch.Tensor, HW: int) -> torch.Tensor:
    """Share of drawn (anchor, negative) pairs, both with a known id (>= 0), that lie in the
    same instance. Ids are per image, so the instance key is (b, id): cross-image pairs never
    count as the same instance (but do count in the denominator)."""
    ida, idp = ids[anchors], ids[pool][neg]                             # [A], [A, R]
    same_img = (anchors // HW)[:, None] == (pool // HW)[neg]
    known = ok & (ida[:, None] >= 0) & (idp >= 0)
    total = known.sum().float()
    same = (known & same_img & (ida[:, None] == idp)).sum().float()
    return torch.where(total > 0, same / total.clamp(min=1), torch.full_like(total, float("nan")))


def _sync(dev: torch.device) -> None:
    # CUDA kernels are asynchronous: without a sync perf_counter would time the launches only.
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
