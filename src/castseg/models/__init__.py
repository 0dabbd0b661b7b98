"""Student / teacher networks (encoder -> neck -> masked-attention decoder) and checkpoints."""

from castseg.models.checkpoint import load_checkpoint, save_checkpoint
from castseg.models.student import (PRESETS, StudentConfig, StudentModel, build_student, count_parameters,
                                    masks_to_image, param_groups)

__all__ = ["PRESETS", "StudentConfig", "StudentModel", "build_student", "count_parameters", "masks_to_image",
           "param_groups", "save_checkpoint", "load_checkpoint"]
