"""Training losses: the Mask2Former set loss (L_sup, L_semi) and its Hungarian matcher."""

from castseg.losses.matcher import HungarianMatcher
from castseg.losses.point_sampling import point_sample, region_bounds, uncertain_points, uniform_points
from castseg.losses.set_loss import SetLoss

__all__ = ["HungarianMatcher", "SetLoss", "point_sample", "region_bounds", "uncertain_points", "uniform_points"]
