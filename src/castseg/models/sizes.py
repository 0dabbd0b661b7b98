"""Parameter counts of the paper's models, computed from their architectures (no download).

Models are built on the meta device: shapes only, no memory, no weights, so `castseg info`
can state the teacher/student ratio of the paper configuration on any machine.
"""

from __future__ import annotations

from typing import Any

import torch

from castseg.models.student import PRESETS, StudentConfig, build_student, count_parameters


def paper_teacher_configs() -> dict[str, dict[str, Any]]:
    """transformers config kwargs of the paper's teacher parts, from their public configs:
    Grounding DINO with Swin-B and Swin-L (384 px, BERT-base text encoder) and SAM2.1-L."""
    def gdino(embed: int, heads: list[int]) -> dict[str, Any]:
        return dict(backbone_config=dict(model_type="swin", embed_dim=embed, depths=[2, 2, 18, 2], num_heads=heads,
                                         window_size=12, image_size=384, out_indices=[2, 3, 4]),
                    text_config=dict(model_type="bert"))
    hiera_l = dict(model_type="sam2_hiera_det_model", hidden_size=144, num_attention_heads=2,
                   blocks_per_stage=[2, 6, 36, 4], embed_dim_per_stage=[144, 288, 576, 1152],
                   num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 16, 8],
                   global_attention_blocks=[23, 33, 43], window_positional_embedding_background_size=[7, 7])
    sam2_l = dict(vision_config=dict(model_type="sam2_vision_model", backbone_config=hiera_l,
                                     backbone_channel_list=[1152, 576, 288, 144]))
    return {"grounding-dino-base": gdino(128, [4, 8, 16, 32]),
            "grounding-dino-large": gdino(192, [6, 12, 24, 48]),
            "sam2.1-hiera-large": sam2_l}


def teacher_parameter_counts() -> dict[str, int]:
    """Parameters of each paper teacher part (SAM2 in image mode: no video-memory modules)."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, Sam2Config, Sam2Model

    cfgs = paper_teacher_configs()
    with torch.device("meta"):
        return {
            "grounding-dino-base": count_parameters(GroundingDinoForObjectDetection(
                GroundingDinoConfig(**cfgs["grounding-dino-base"]))),
            "grounding-dino-large": count_parameters(GroundingDinoForObjectDetection(
                GroundingDinoConfig(**cfgs["grounding-dino-large"]))),
            "sam2.1-hiera-large": count_parameters(Sam2Model(Sam2Config(**cfgs["sam2.1-hiera-large"]))),
        }


def student_parameter_counts() -> dict[str, int]:
    """Parameters of every student preset (random init on the meta device)."""
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = count_parameters(build_student(StudentConfig.from_preset(name, pretrained=False)))
    return counts
