"""One training (or pseudo-labelling) step of each model, replayed on the meta device for
:mod:`castseg.plan`: its FLOPs and the peak bytes of its live tensors, without weights or data.

How memory is measured: :class:`LiveBytes` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that sees every tensor an operator creates during forward, loss and backward (the autograd
engine carries the mode into backward). It adds the bytes of each new storage (views share
their base's) and a weak-reference finaliser takes them off when the storage dies — so the
count follows the real lifetimes: transients of the forward, tensors autograd saves for
backward, activation gradients freed as backward walks the graph. Meta tensors have no data
but the same shapes, dtypes and lifetimes, hence the same bytes. Parameter gradients are moved
to their own count when autograd stores them (``register_post_accumulate_grad_hook``), so
``activations`` is the peak of everything else: this is why it was chosen over counting
``saved_tensors_hooks`` (which misses forward transients, e.g. a no-grad pass of the strong
view, and backward's activation gradients) and over ``MemTracker`` (which also needs the
optimizer step run on the fake tensors).

FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` over the same replay, backward
included (matmuls, convolutions, attention; 2 per multiply-add).

What is approximated: the set loss's Hungarian matching (scipy, data-dependent) cannot run on
meta tensors. :func:`set_loss_like` does what the loss does to the outputs once matched: per
decoder layer, cross-entropy of the class logits and, per image, the matched queries' mask
logits gathered (``instances`` of them) and point-sampled at ``num_points`` points (plus the
no-grad oversampled candidates and the matcher's points). Grounding DINO + SAM2's adaptation
loss is replaced by a sum of the detector's outputs and of SAM2's mask logits for
``max_mask_prompts`` boxes per image; the detector's matcher is likewise not run.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

META = torch.device("meta")


_RESIZE = ("upsample_bilinear2d", "upsample_nearest2d", "_upsample_bilinear2d_aa", "upsample_bicubic2d",
           "_upsample_nearest_exact2d")


def _resized(func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """The output of a 2-D resize (or its backward) on meta tensors, made directly: the meta
    device runs these through Python decompositions, most of a replay's time; resizing is
    not counted as FLOPs anyway. None for any other op."""
    name = func._overloadpacket.__name__
    base = name.removesuffix("_backward")
    if base not in _RESIZE or not args[0].is_meta:
        return None
    x = args[0]
    if name.endswith("_backward"):  # (grad_output, output_size, input_size, ...)
        return x.new_empty(tuple(args[2]))
    size = args[1] if len(args) > 1 else kwargs.get("output_size")
    if size is None:  # .vec with scale factors
        scales = args[3] if len(args) > 3 else kwargs.get("scale_factors")
        size = [int(n * f) for n, f in zip(x.shape[-2:], scales)]
    return x.new_empty((*x.shape[:-2], *size))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages operators create while active: ``peak_activations`` (all but
    parameter gradients), ``grads`` (gradients stored in ``.grad``), ``peak`` (both together)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = {"act": 0, "grad": 0}
        self.peak_activations = self.peak = 0
        self._kind: dict[int, tuple[weakref.ref, int, str]] = {}

    def _add(self, t: Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._kind and self._kind[key][0]() is st:
            return  # a view, or an op that returned its input
        n = st.nbytes()
        self._kind[key] = (weakref.ref(st), n, "act")
        self.live["act"] += n
        weakref.finalize(st, self._gone, key)
        self._update()

    def _gone(self, key: int) -> None:
        _, n, kind = self._kind.pop(key)
        self.live[kind] -= n

    def _update(self) -> None:
        self.peak_activations = max(self.peak_activations, self.live["act"])
        self.peak = max(self.peak, self.live["act"] + self.live["grad"])

    def mark_grad(self, p: Tensor) -> None:
        """Move ``p.grad``'s storage from the activations to the gradients."""
        if p.grad is None:
            return
        entry = self._kind.get(id(p.grad.untyped_storage()))
        if entry is not None and entry[2] == "act":
            self._kind[id(p.grad.untyped_storage())] = (entry[0], entry[1], "grad")
            self.live["act"] -= entry[1]
            self.live["grad"] += entry[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            # ``.item()`` of a meta tensor: e.g. Grounding DINO's training-mode "all finite?"
            # check; answer "yes" (1) so the step goes on along its usual path
            return {torch.bool: True}.get(args[0].dtype, 1) if not args[0].is_floating_point() else 1.0
        out = _resized(func, args, kwargs or {})
        if out is None:
            out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._add(t)
        return out


@contextlib.contextmanager
def no_grad_pass(model: nn.Module) -> Iterator[None]:
    """``torch.no_grad()`` with ``model``'s parameters frozen for its duration: a view of a
    trainable parameter made under no_grad (e.g. the decoder's expanded query embeddings) has no
    gradient edge, which FlopCounterMode's module tracker cannot hook; the memory is the same."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Global:
    """A stand-in for FlopCounterMode's module tracker: every FLOP goes to "Global". The real
    one hooks every module call (and its backward), which made a Grounding DINO replay ~3x
    slower; only the total is reported here."""

    parents = {"Global"}

    def __enter__(self) -> "_Global":
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def flop_counter() -> Any:
    """A :class:`~torch.utils.flop_counter.FlopCounterMode` that only keeps the total."""
    from torch.utils.flop_counter import FlopCounterMode

    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Global()
    aten = torch.ops.aten
    # the fused CPU attention that _fused_sdpa routes meta attention to has no formula of its own
    counter.flop_registry[aten._scaled_dot_product_flash_attention_for_cpu] = \
        lambda q, k, v, *a, **kw: sdpa_flop_count(q.shape, k.shape, v.shape)
    counter.flop_registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
        lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
    return counter


def _fused_sdpa(original: Callable) -> Callable:
    """``F.scaled_dot_product_attention`` that, on meta tensors, takes the fused (flash)
    kernel CPU and CUDA take — which saves only a log-sum-exp for backward — instead of the
    meta device's math fallback, which would count a saved [B,heads,N,N] attention matrix."""
    def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: float | None = None, **kw: Any) -> Tensor:
        learned_bias = attn_mask is not None and attn_mask.requires_grad  # the fused CPU kernel has no grad for it
        if not q.is_meta or kw.get("enable_gqa") or q.shape[-1] != v.shape[-1] or learned_bias:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # as the CPU kernel's caller converts it
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return sdpa


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route meta-device attention through :func:`_fused_sdpa` while active."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def replay(model: nn.Module, step: Callable[[], Tensor | None]) -> dict[str, Any]:
    """Run ``step()`` (builds its inputs on the meta device, returns the loss or None for an
    inference step) and ``backward``; returns ``{"flops", "activations", "grads"}`` (bytes)."""
    from castseg.models.sizes import _tensor_checks_off

    tracker = LiveBytes()
    hooks = [p.register_post_accumulate_grad_hook(tracker.mark_grad) for p in model.parameters() if p.requires_grad]
    try:
        with _tensor_checks_off(), fused_attention(), flop_counter() as counter, tracker:
            loss = step()
            if loss is not None:
                loss.backward()
                del loss
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {"flops": counter.get_total_flops(), "activations": tracker.peak_activations,
            "grads": tracker.live["grad"]}


# --------------------------------------------------------------------- student architecture


def set_loss_like(pred: dict[str, Any], instances: int, num_points: int) -> Tensor:
    """What :class:`~castseg.losses.set_loss.SetLoss` does to ``pred`` (``pred_logits``
    [B,Q,C+1], ``pred_masks`` [B,Q,h,w], ``aux_outputs``) after matching, with ``instances``
    matched queries per image: CE of every query, then the matched masks gathered [M,h,w]
    (M = B·instances) and point-sampled at ``num_points`` points (with the no-grad candidates
    of importance sampling, 3x as many, and the matcher's ``num_points`` over all queries)."""
    from castseg.losses.point_sampling import point_sample

    total = pred["pred_logits"].new_zeros(())
    for layer in [pred, *pred.get("aux_outputs", [])]:
        logits, masks = layer["pred_logits"], layer["pred_masks"]
        b, q = logits.shape[:2]
        total = total + F.cross_entropy(logits.float().transpose(1, 2), logits.new_zeros(b, q, dtype=torch.long))
        m = min(instances, q)
        if m == 0:
            continue
        with torch.no_grad():  # the matcher's cost points, one image at a time
            for i in range(b):
                point_sample(masks[i].float(), masks.new_zeros(num_points, 2))
        img = torch.arange(b, device=masks.device).repeat_interleave(m)
        src = masks[img, torch.arange(m, device=masks.device).repeat(b)]  # [M, h, w], as set_loss gathers
        with torch.no_grad():
            point_sample(src.detach(), masks.new_zeros(len(src), 3 * num_points, 2))
        sampled = point_sample(src, masks.new_zeros(len(src), num_points, 2))
        total = total + F.binary_cross_entropy_with_logits(sampled, torch.zeros_like(sampled))
    return total


def student_step(model: nn.Module, batch: int, size: tuple[int, int], *, train: bool, pxl: bool,
                 instances: int, num_points: int) -> dict[str, Any]:
    """Replay one step of a student-architecture model on a ``[batch,3,H,W]`` batch: CAST's J
    (:mod:`castseg.objective`: one gradient forward of all images, with embeddings and a
    no-grad forward of the strong views when ``pxl``) when ``train``, else one no-grad forward."""
    model.train(train)

    def step() -> Tensor | None:
        x = torch.zeros(batch, 3, *size, device=META)
        if not train:
            with no_grad_pass(model):
                model(x)
            return None
        pred = model(x, return_embeddings=pxl)
        loss = set_loss_like(pred, instances, num_points)
        if pxl:
            with no_grad_pass(model):
                strong = model(torch.zeros_like(x), return_embeddings=True)["embeddings"]
            # L_pxl reads a few anchors of both maps; a reduction keeps the embeddings in the graph
            loss = loss + (pred["embeddings"] * strong).sum()
        return loss

    return replay(model, step)


# --------------------------------------------------------------------- Grounding DINO + SAM2


def grounded_sam_step(det: nn.Module, sam: nn.Module, batch: int, size: tuple[int, int], opts: dict[str, Any],
                      *, train: bool, text_tokens: int) -> dict[str, Any]:
    """Replay one adaptation step (``train``) or one pseudo-labelling pass of Grounding DINO +
    SAM2 on ``batch`` images of ``size``: the detector at its input size with ``text_tokens``
    tokens; SAM2's image encoder (no grad unless ``train_image_encoder``); the mask decoder for
    ``max_mask_prompts`` boxes per image when training, ``max_detections`` (in ``box_chunk``
    chunks) when predicting."""
    from castseg.models.grounded_sam import fit_size

    dh, dw = fit_size(*size, opts["detector_size"])
    s = int(sam.config.prompt_encoder_config.image_size)

    def step() -> Tensor | None:
        with contextlib.nullcontext() if train else no_grad_pass(model):
            ids = torch.zeros(batch, text_tokens, dtype=torch.long, device=META)
            det_out = det(pixel_values=torch.zeros(batch, 3, dh, dw, device=META), input_ids=ids,
                          attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
            loss = det_out.logits.float().sum() + det_out.pred_boxes.float().sum() if train else None
            del det_out
            with torch.set_grad_enabled(train and opts["train_image_encoder"]):
                feats = list(sam.vision_encoder(torch.zeros(batch, 3, s, s, device=META),
                                                return_dict=True).fpn_hidden_states)
            feats[0], feats[1] = sam.mask_decoder.conv_s0(feats[0]), sam.mask_decoder.conv_s1(feats[1])
            boxes = opts["max_mask_prompts"] if train else opts["max_detections"]
            chunk = boxes if train else opts["box_chunk"]
            for i in range(batch):
                for start in range(0, boxes, chunk):
                    k = min(chunk, boxes - start)
                    masks = sam(image_embeddings=[f[i:i + 1] for f in feats],
                                input_boxes=torch.zeros(1, k, 4, device=META), multimask_output=False).pred_masks
                    if train:
                        loss = loss + masks.float().sum()
            return loss

    det.train(train and opts["train_detector"])
    sam.train(train)
    sam.vision_encoder.train(train and opts["train_image_encoder"])
    model = nn.ModuleList([det, sam])
    return replay(model, step)
