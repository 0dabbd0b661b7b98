"""Training losses: the Mask2Former set loss (L_sup, L_semi) with its Hungarian matcher, and
CAST's instance-aware pixel-wise contrastive loss (L_pxl)."""

from castseg.losses.matcher import HungarianMatcher
from castseg.losses.pixel_contrastive import PixelContrastiveLoss, debias_weights, sample_negatives, sampler_features
from castseg.losses.point_sampling import point_sample, region_bounds, uncertain_points, uniform_points
from castseg.losses.set_loss import SetLoss

__all__ = ["HungarianMatcher", "PixelContrastiveLoss", "SetLoss", "debias_weights", "point_sample", "region_bounds",
           "sample_negatives", "sampler_features", "uncertain_points", "uniform_points"]
