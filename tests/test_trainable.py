"""How stages train teachers (castseg.trainable): one gradient-carrying forward per step, so
DistributedDataParallel can follow stage 1c, and the pretrained parts at the backbone rate."""

from __future__ import annotations

import pytest
import torch

from castseg.config_sections import LossConfig, TrainConfig
from castseg.engine.optim import build_optimizer
from castseg.errors import CastsegError
from castseg.models.grounded_sam import GroundedSAMTeacher
from castseg.models.tiny_teacher import TINY_DETECTOR, TINY_SEGMENTER, save_tiny_tokenizer
from castseg.trainable import trainable_for


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tok = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), ["nucleus"])
    torch.manual_seed(0)
    return GroundedSAMTeacher(pretrained=False, detector_config=TINY_DETECTOR, segmenter_config=TINY_SEGMENTER,
                              tokenizer=str(tok), detector_size=(64, 96), class_names=["nucleus"])


def batch(n: int, with_masks: bool, h: int = 48, w: int = 64) -> dict:
    targets = []
    for _ in range(n):
        m = torch.zeros((1 if with_masks else 0), h, w, dtype=torch.bool)
        if with_masks:
            m[0, 8:30, 10:40] = True
        targets.append({"labels": torch.zeros(len(m), dtype=torch.long), "masks": m})
    return {"images": torch.rand(n, 3, h, w), "targets": targets}


@pytest.mark.parametrize("unlabeled_masks", [True, False])
def test_stage_1c_makes_one_forward_per_step(teacher, unlabeled_masks):
    """Stage 1c used to run the teacher once on the labeled and once on the pseudo-labelled crops,
    both graphs alive until backward: under DDP a step whose unlabeled crops had no masks left
    SAM2's decoder unused in one forward and raised "marked ready twice". Now both batches are
    one forward, and every trainable part gets a gradient even when the pseudo-labels are empty."""
    calls = []
    hook = teacher.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    try:
        loss_fn = trainable_for(teacher).loss_fn(["nucleus"], LossConfig(), 1.0, 0.0)
        out = loss_fn(teacher, {"labeled": batch(2, True), "unlabeled": batch(2, unlabeled_masks)}, 0)
    finally:
        hook.remove()
    assert calls == [4]  # one forward over the 2 labeled + 2 pseudo-labelled crops
    assert torch.isfinite(out["loss"]) and {"loss_det", "loss_mask_bce", "loss_mask_dice"} <= set(out)
    out["loss"].backward()
    assert any(p.grad is not None for p in teacher.segmenter.mask_decoder.parameters())
    teacher.zero_grad(set_to_none=True)
    # λ_semi = 0 (stage 1a has no unlabeled stream; a config could still pass one): labeled only
    calls.clear()
    hook = teacher.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    try:
        trainable_for(teacher).loss_fn(["nucleus"], LossConfig(), 0.0, 0.0)(
            teacher, {"labeled": batch(2, True), "unlabeled": batch(2, True)}, 0)
    finally:
        hook.remove()
    assert calls == [2]
    with pytest.raises(CastsegError, match="λ_semi must be 0 or 1"):
        trainable_for(teacher).loss_fn(["nucleus"], LossConfig(), 0.5, 0.0)


def test_the_teachers_pretrained_parts_adapt_at_the_backbone_rate(teacher):
    """The detector's Swin and BERT (and SAM2's image encoder, when trained) used to adapt at the
    head rate: only parameters named ``encoder.*`` (the student's) got ``backbone_lr_mult``."""
    cfg = TrainConfig(lr=1e-4, backbone_lr_mult=0.1)
    opt = build_optimizer(teacher, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(teacher.named_parameters())
    swin = [n for n in named if n.startswith("detector.model.backbone.") and named[n].requires_grad]
    bert = [n for n in named if n.startswith("detector.model.text_backbone.") and named[n].requires_grad]
    heads = [n for n in named if n.startswith("detector.model.decoder.") and named[n].requires_grad]
    assert swin and bert and heads
    assert all(lr_of[id(named[n])] == pytest.approx(1e-5) for n in swin + bert)
    assert all(lr_of[id(named[n])] == pytest.approx(1e-4) for n in heads)
