"""Every preset and every encoder/neck variant trains: forward, real set loss, backward.

Random init throughout (``pretrained=False``: offline). Each case runs a 2-image batch through
the model, checks the output shapes, computes :class:`SetLoss` against 1-2 random masks per
image and checks that the loss is finite and that every trainable parameter of the encoder, the
neck and the decoder receives a non-zero, finite gradient. ``base`` and ``large`` are marked
``slow`` (a few seconds each on CPU, mostly initialising ~100M / ~330M random parameters); the
whole file takes ~20 s on a 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

from castseg.losses.matcher import HungarianMatcher
from castseg.losses.set_loss import SetLoss
from castseg.models import PRESETS, StudentConfig, build_student

NUM_CLASSES = 2
NUM_POINTS = 256
SIZE = 64  # small, and a multiple of pad_multiple (32), so padded_size == image_size

RESNET = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}
VARIANTS = {
    "dinov2+dpt": {},
    "dinov2+fpn": {"neck": "fpn"},
    "resnet+dpt": {"encoder_type": "backbone", "encoder_config": RESNET, "out_indices": (1, 2, 3, 4)},
    "resnet+fpn": {"encoder_type": "backbone", "encoder_config": RESNET, "out_indices": (1, 2, 3, 4), "neck": "fpn"},
}
SLOW_PRESETS = {"base", "large"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, 2 OpenMP threads that wait for each other
    made these small forward/backward passes ~10x slower (measured); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_targets(batch: int, size: int, gen: torch.Generator) -> list[dict]:
    """1 instance in image 0, 2 in image 1: random non-empty rectangles, random classes."""
    targets = []
    for i in range(batch):
        n = 1 + i % 2
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for k in range(n):
            y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
            h, w = (int(v) for v in torch.randint(4, size // 2, (2,), generator=gen))
            masks[k, y0:y0 + h, x0:x0 + w] = True
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen), "masks": masks})
    return targets


def grad_report(module: torch.nn.Module) -> tuple[int, int, list[str]]:
    """(trainable parameters, those with a non-zero gradient, names with a non-finite gradient)."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    nonzero = sum(1 for _, p in trainable if p.grad is not None and bool(p.grad.abs().sum() > 0))
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    return len(trainable), nonzero, bad


def check_trains(cfg: StudentConfig, size: int = SIZE) -> None:
    torch.manual_seed(0)
    model = build_student(cfg)
    model.train()
    x = torch.rand(2, 3, size, size)
    out = model(x)

    q, c, s = cfg.num_queries, cfg.num_classes, out["mask_stride"]
    assert out["image_size"] == (size, size) and out["padded_size"] == (size, size)
    assert out["pred_logits"].shape == (2, q, c + 1)
    assert out["pred_masks"].shape == (2, q, size // s, size // s)
    assert len(out["aux_outputs"]) == cfg.dec_layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, c + 1)
        assert aux["pred_masks"].shape == (2, q, size // s, size // s)

    gen = torch.Generator().manual_seed(0)
    criterion = SetLoss(NUM_CLASSES, matcher=HungarianMatcher(num_points=NUM_POINTS), num_points=NUM_POINTS)
    losses = criterion(out, random_targets(2, size, gen), generator=gen)
    loss = losses["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert all(torch.isfinite(losses[k]) for k in ("loss_ce", "loss_mask", "loss_dice"))
    loss.backward()

    for part in ("encoder", "neck", "decoder"):
        total, nonzero, bad = grad_report(getattr(model, part))
        assert total > 0, f"{part} has no trainable parameters"
        assert not bad, f"non-finite gradients in {part}: {bad[:5]}"
        # Every trainable tensor is on the loss's path (frozen BN statistics and DINOv2's unused
        # mask_token are not trainable parameters here).
        assert nonzero == total, f"{part}: only {nonzero}/{total} parameter tensors got a non-zero gradient"


@pytest.mark.parametrize(
    "preset",
    [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PRESETS else p for p in PRESETS],
)
def test_preset_trains(preset):
    check_trains(StudentConfig.from_preset(preset, pretrained=False, num_classes=NUM_CLASSES))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains(variant):
    check_trains(StudentConfig.from_preset("tiny", pretrained=False, num_classes=NUM_CLASSES, **VARIANTS[variant]))


def test_every_preset_is_covered():
    assert set(PRESETS) >= {"tiny", "small", "base", "large"}
