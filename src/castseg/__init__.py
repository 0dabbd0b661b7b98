"""castseg: CAST semi-supervised distillation for instance segmentation."""

__version__ = "0.1.0"
