"""A classical nuclei segmenter: Otsu threshold + distance-transform watershed.

No learning. It is the floor every learned row in a castseg report must clear, and it lets the
data → predictions → evaluation path run before any model is trained.
"""

from __future__ import annotations

import cv2
import numpy as np


def segment_nuclei(image: np.ndarray, min_area: int = 12, split_touching: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Instances of blob-like objects in one image.

    Args:
        image: ``uint8`` ``[H,W,3]``.
    Returns:
        masks ``bool`` ``[N,H,W]`` and scores ``float32`` ``[N]`` (mean foreground contrast,
        so confident, high-contrast blobs rank first in AP).
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    # Objects are the minority class: on bright backgrounds (histology, brightfield) they are dark.
    if grey.mean() > 127:
        grey = 255 - grey
    grey = cv2.GaussianBlur(grey, (3, 3), 0)
    thr, fg = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if split_touching:
        dist = cv2.distanceTransform(fg, cv2.DIST_L2, 3)
        # Markers: regional maxima of the distance map, found by dilation equality.
        peaks = (dist == cv2.dilate(dist, np.ones((7, 7), np.uint8))) & (dist > 2.0)
        n_markers, markers = cv2.connectedComponents(peaks.astype(np.uint8))
        markers = markers + 1
        markers[fg == 0] = 0
        unknown = (fg > 0) & (markers == 1)
        markers[unknown] = 0
        markers[fg == 0] = 1
        labels = cv2.watershed(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), markers.astype(np.int32))
        labels[labels <= 1] = 0
        labels = labels - 1
        labels[labels < 0] = 0
    else:
        _, labels = cv2.connectedComponents(fg)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    masks, scores = [], []
    span = max(float(grey.max()) - thr, 1.0)
    for i in ids:
        m = labels == i
        if m.sum() < min_area:
            continue
        masks.append(m)
        scores.append(float(np.clip((grey[m].mean() - thr) / span, 0.0, 1.0)))
    if not masks:
        return np.zeros((0,) + grey.shape, bool), np.zeros((0,), np.float32)
    return np.stack(masks), np.asarray(scores, np.float32)
