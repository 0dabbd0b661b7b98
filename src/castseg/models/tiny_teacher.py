"""A tiny random Grounding DINO + SAM2 teacher, written to disk like a real one.

Tests and CPU smoke runs need the composite teacher's whole path — `from_pretrained` from a
folder, tokenisation, detection, box-prompted masks — without downloading 568M parameters.
:func:`save_tiny_grounded_sam` writes a folder that `GroundedSAMTeacher.from_pretrained` (and
`build_teacher({"type": "grounded_sam", "path": ...})`) loads exactly as it loads an adapted
real teacher. Its predictions are random: it proves plumbing, not quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

# Grounding DINO hard-codes bert-base-uncased's delimiter ids ([CLS] 101, [SEP] 102, "." 1012,
# "?" 1029; [PAD] 0), so the tiny vocabulary puts them there and fills the gaps with words.
_FIXED_TOKENS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
VOCAB_SIZE = 1030

TINY_DETECTOR = dict(
    backbone_config=dict(model_type="swin", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                         image_size=64, out_features=["stage2", "stage3", "stage4"]),
    text_config=dict(model_type="bert", vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
    d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
    decoder_attention_heads=2, num_queries=30, max_text_len=32, encoder_n_points=2, decoder_n_points=2,
    dropout=0.0, fusion_droppath=0.0)

TINY_SEGMENTER = dict(
    vision_config=dict(model_type="sam2_vision_model", backbone_channel_list=[64, 32, 16, 8],
                       backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=16,
                       backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=8, image_size=[64, 64],
                                            blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                                            num_attention_heads_per_stage=[1, 1, 1, 1],
                                            window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3],
                                            window_positional_embedding_background_size=[2, 2])),
    prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
    mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    # The default 0.02 makes the tiny SAM2's mask logits ~1e-6: nothing to learn from.
    initializer_range=0.2)


def tiny_vocab(words: Sequence[str]) -> dict[str, int]:
    """A 1030-entry BERT vocabulary with Grounding DINO's delimiter ids in place."""
    it = iter(dict.fromkeys(w.lower() for w in words))
    return {_FIXED_TOKENS.get(i) or next(it, None) or f"[unused{i}]": i for i in range(VOCAB_SIZE)}


def save_tiny_tokenizer(path: str | Path, words: Sequence[str]) -> Path:
    from transformers import BertTokenizer

    path = Path(path)
    BertTokenizer(vocab=tiny_vocab(words)).save_pretrained(path)
    return path


def save_tiny_grounded_sam(path: str | Path, class_names: Sequence[str], seed: int = 0,
                           detector_size: Sequence[int] = (64, 96), **options) -> Path:
    """Write a random tiny grounded-SAM teacher folder (detector/, segmenter/, teacher.json)."""
    from castseg.models.grounded_sam import GroundedSAMTeacher

    path = Path(path)
    words = [w for name in class_names for w in name.lower().split()]
    tok = save_tiny_tokenizer(path / "_tokenizer", words)
    torch.manual_seed(seed)
    opts = dict(pretrained=False, detector_config=TINY_DETECTOR, segmenter_config=TINY_SEGMENTER, tokenizer=str(tok),
                detector_size=tuple(detector_size), class_names=list(class_names))
    teacher = GroundedSAMTeacher(**{**opts, **options})
    teacher.save_pretrained(path)
    return path
