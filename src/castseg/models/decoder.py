"""Mask2Former-style masked-attention transformer decoder (our own implementation).

Learnable queries attend, layer by layer, to one pyramid level at a time (round robin over
strides 32/16/8). Cross-attention of each query is restricted to the pixels inside the mask it
predicted at the previous step (sigmoid > 0.5); a query whose mask is empty at that level
attends everywhere instead, as Mask2Former does, so no attention row is fully masked (which
would give NaNs). Every step (the initial queries and every layer) makes a prediction, for deep
supervision.

Only standard ops (Linear, LayerNorm, nn.MultiheadAttention with a boolean mask, einsum,
bilinear interpolate), so the decoder exports to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sine_position_embedding(h: int, w: int, dim: int, like: torch.Tensor, temperature: float = 10000.0
                            ) -> torch.Tensor:
    """DETR-style 2D sine/cosine encoding of normalised cell centres: ``[h*w, dim]`` (half of the
    channels encode y, half x). Normalising to (0, 2*pi) makes it independent of the image size."""
    npf = dim // 2
    ys = (torch.arange(h, device=like.device, dtype=torch.float32) + 0.5) * (2 * math.pi / h)
    xs = (torch.arange(w, device=like.device, dtype=torch.float32) + 0.5) * (2 * math.pi / w)
    dim_t = temperature ** (2 * torch.div(torch.arange(npf, device=like.device), 2, rounding_mode="floor")
                            .to(torch.float32) / npf)
    py, px = ys[:, None] / dim_t, xs[:, None] / dim_t  # [h, npf], [w, npf]
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat((py[:, None, :].expand(h, w, npf), px[None, :, :].expand(h, w, npf)), dim=2)
    if dim % 2:  # odd widths: pad one zero channel
        pos = F.pad(pos, (0, 1))
    return pos.reshape(h * w, dim).to(like.dtype)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between: ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskedAttentionLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each with residual + post-LayerNorm.

    ``q`` ``[B,Q,D]``, ``q_pos`` ``[1 or B,Q,D]``, ``memory``/``mem_pos`` ``[B or 1,S,D]``,
    ``attn_mask`` bool ``[B*heads,Q,S]`` (True = may not attend). Returns ``[B,Q,D]``.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, q_pos: torch.Tensor, memory: torch.Tensor, mem_pos: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        a = self.cross_attn(q + q_pos, memory + mem_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        q = self.norm1(q + self.dropout(a))
        qk = q + q_pos
        a = self.self_attn(qk, qk, q, need_weights=False)[0]
        q = self.norm2(q + self.dropout(a))
        return self.norm3(q + self.dropout(self.ffn(q)))


class MaskedAttentionDecoder(nn.Module):
    """Queries -> per-query class logits and mask logits, with a prediction after every step.

    Args: ``in_dim``: width of the pyramid maps; ``hidden_dim``: query width; ``num_classes``: C
    (the class head gives C+1, the last being "no object"); ``num_queries``; ``num_layers`` (L);
    ``num_heads``; ``dim_feedforward``; ``mask_dim``: width of the mask features;
    ``num_levels``: how many pyramid maps to cycle through (coarse first).

    ``forward(multi_scale, mask_features)`` with ``multi_scale`` = list of ``[B,in_dim,h_l,w_l]``
    (coarse to fine) and ``mask_features`` ``[B,mask_dim,Hm,Wm]`` returns a list of L+1
    predictions (initial queries first, last layer last), each
    ``{"pred_logits": [B,Q,C+1], "pred_masks": [B,Q,Hm,Wm]}``.
    """

    def __init__(self, in_dim: int = 256, hidden_dim: int = 256, num_classes: int = 1, num_queries: int = 100,
                 num_layers: int = 9, num_heads: int = 8, dim_feedforward: int = 2048, mask_dim: int = 256,
                 num_levels: int = 3, dropout: float = 0.0, mask_threshold: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.mask_threshold = mask_threshold
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_dim == hidden_dim else nn.Conv2d(in_dim, hidden_dim, 1) for _ in range(num_levels))
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # content of the queries
        self.query_pos = nn.Embedding(num_queries, hidden_dim)   # their learned positional part
        self.layers = nn.ModuleList(MaskedAttentionLayer(hidden_dim, num_heads, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def _predict(self, q: torch.Tensor, mask_features: torch.Tensor, attn_hw: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads on the current queries; also the attention mask ``[B*heads,Q,h*w]`` for the
        next layer, which attends to a level of size ``attn_hw``."""
        x = self.decoder_norm(q)
        logits = self.class_head(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        # The mask only gates attention; no gradient flows through the thresholding anyway.
        m = F.interpolate(masks.detach(), size=attn_hw, mode="bilinear", align_corners=False)
        blocked = (m.sigmoid() < self.mask_threshold).flatten(2)
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)  # empty mask -> attend everywhere
        return logits, masks, blocked.repeat_interleave(self.num_heads, dim=0)

    def forward(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if len(multi_scale) != self.num_levels:
            raise ValueError(f"decoder expects {self.num_levels} pyramid maps, got {len(multi_scale)}")
        B = mask_features.shape[0]
        memories, mem_pos, sizes = [], [], []
        for lvl, x in enumerate(multi_scale):
            x = self.input_proj[lvl](x)
            h, w = x.shape[-2:]
            sizes.append((h, w))
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl])
            mem_pos.append(sine_position_embedding(h, w, x.shape[1], x)[None])
        q = self.query_feat.weight[None].expand(B, -1, -1)
        q_pos = self.query_pos.weight[None]
        logits, masks, blocked = self._predict(q, mask_features, sizes[0])
        preds = [{"pred_logits": logits, "pred_masks": masks}]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            q = layer(q, q_pos, memories[lvl], mem_pos[lvl], blocked)
            logits, masks, blocked = self._predict(q, mask_features, sizes[(i + 1) % self.num_levels])
            preds.append({"pred_logits": logits, "pred_masks": masks})
        return preds
