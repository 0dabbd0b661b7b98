"""Cleaning pseudo-labels before the student learns from them.

A mask-transformer teacher's instances overlap (several queries claim one object, a big mask
covers two touching objects, small specks ride along), which costs nothing in AP but teaches a
student, who takes each instance above L_semi's threshold as ground truth, to duplicate and to
merge. Three optional, training-free steps, in this order, per image:

1. ``overlaps="exclusive"``: each pixel goes to the highest-scoring instance that claims it; an
   instance left with under ``keep_fraction`` of its own area is dropped (it was a duplicate).
2. ``split_touching``: an instance in several pieces becomes one instance per piece, and a
   non-convex piece (pixel count / area of the convex hull through its boundary pixels' centres
   < ``solidity``; two touching equal discs: about 0.88) whose distance-transform cores
   (distance > ``core_fraction`` · its maximum) fall apart is cut between them by a watershed on
   the distance map. This is the classical split of touching blob-like objects (nuclei, cells,
   grains): it assumes the objects are roughly convex, so it is off unless asked for.
3. ``min_area``: instances (or pieces) under this many pixels are dropped.

Split pieces keep their instance's score and class. The cache on disk is never changed: this
runs when the pseudo-labels are read (:class:`~castseg.pseudo_labels.PseudoLabeledDataset`) and
when their quality is reported, so both see the same instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from scipy import ndimage

from castseg.data import masks as M


# The LossConfig fields that choose the cleanup (part of a stage's settings when it is active).
CLEANUP_KEYS = ["pseudo_label_overlaps", "pseudo_label_split", "pseudo_label_min_area"]


@dataclass(frozen=True)
class Cleanup:
    """What :func:`clean_instances` does; the default does nothing."""

    overlaps: Literal["keep", "exclusive"] = "keep"
    split_touching: bool = False
    min_area: int = 0
    keep_fraction: float = 0.5
    solidity: float = 0.9
    core_fraction: float = 0.5

    @property
    def active(self) -> bool:
        return self.overlaps == "exclusive" or self.split_touching or self.min_area > 0

    @classmethod
    def from_loss(cls, loss: Any) -> "Cleanup":
        """The cleanup a :class:`~castseg.config_sections.LossConfig` asks for."""
        return cls(overlaps=loss.pseudo_label_overlaps, split_touching=loss.pseudo_label_split,
                   min_area=loss.pseudo_label_min_area)


def _cut_at_cores(piece: np.ndarray, solidity: float, core_fraction: float) -> list[np.ndarray]:
    """One connected ``piece`` ``[H,W]`` bool → the objects it holds (itself if it looks like one)."""
    u = piece.astype(np.uint8)
    contours, _ = cv2.findContours(u, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    if hull <= 0 or piece.sum() / hull >= solidity:
        return [piece]
    dist = cv2.distanceTransform(u, cv2.DIST_L2, 3)
    n, cores = cv2.connectedComponents((dist > core_fraction * dist.max()).astype(np.uint8))
    if n <= 2:
        return [piece]
    markers = cores.astype(np.int32) + 1  # cores 2..n, background 1, to flood 0
    markers[piece & (cores == 0)] = 0
    relief = cv2.cvtColor((255 - np.clip(dist * 255 / dist.max(), 0, 255)).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    labels = cv2.watershed(relief, markers)
    # Watershed lines and the rim the background flooded go to the nearest object.
    lost = piece & (labels < 2)
    if lost.any():
        _, (iy, ix) = ndimage.distance_transform_edt(labels < 2, return_indices=True)
        labels = np.where(lost, labels[iy, ix], labels)
    return [(labels == i) & piece for i in range(2, n + 1)]


def split_instance(mask: np.ndarray, solidity: float = 0.9, core_fraction: float = 0.5) -> list[np.ndarray]:
    """``mask`` ``[H,W]`` bool → its objects: one per connected piece, touching convex objects
    in a piece cut apart (see the module docstring)."""
    n, pieces = cv2.connectedComponents(mask.astype(np.uint8))
    return [p for i in range(1, n) for p in _cut_at_cores(pieces == i, solidity, core_fraction)]


def clean_instances(masks: np.ndarray, cleanup: Cleanup) -> tuple[np.ndarray, np.ndarray]:
    """One image's instances, by descending score: ``masks`` ``[N,H,W]`` bool →
    ``(cleaned [K,H,W] bool, source [K] int64)``, ``source[k]`` the input instance piece k came
    from (for its score and class)."""
    if not cleanup.active or len(masks) == 0:
        return masks, np.arange(len(masks), dtype=np.int64)
    out: list[np.ndarray] = []
    source: list[int] = []
    taken = np.zeros(masks.shape[1:], dtype=bool)
    for i, m in enumerate(masks):
        if cleanup.overlaps == "exclusive":
            area = int(m.sum())
            m = m & ~taken
            if area == 0 or m.sum() < cleanup.keep_fraction * area:
                continue
            taken |= m
        pieces = split_instance(m, cleanup.solidity, cleanup.core_fraction) if cleanup.split_touching else [m]
        for p in pieces:
            if p.any() and p.sum() >= cleanup.min_area:
                out.append(p)
                source.append(i)
    if not out:
        return np.zeros((0,) + masks.shape[1:], dtype=bool), np.zeros(0, dtype=np.int64)
    return np.stack(out), np.asarray(source, dtype=np.int64)


def clean_records(records: list[dict[str, Any]], cleanup: Cleanup, score_threshold: float) -> list[dict[str, Any]]:
    """COCO results with ``score ≥ score_threshold``, cleaned per image (what the student is
    taught): one record per cleaned instance, by descending score within each image, its mask
    and bbox re-encoded. With an inactive ``cleanup`` the kept records are returned unchanged."""
    kept = [r for r in records if r["score"] >= score_threshold]
    if not cleanup.active:
        return kept
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(kept, key=lambda r: -r["score"]):
        by_image.setdefault(r["image_id"], []).append(r)
    out: list[dict[str, Any]] = []
    for recs in by_image.values():
        masks, source = clean_instances(np.stack([M.decode(r["segmentation"]).astype(bool) for r in recs]), cleanup)
        for m, s in zip(masks, source):
            rle = M.encode(m)
            out.append({**recs[s], "segmentation": rle, "bbox": M.bbox(rle)})
    return out
