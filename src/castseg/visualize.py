"""Instance overlays that stay legible on dark (fluorescence) and bright (histology) images."""

from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw


def palette(n: int) -> np.ndarray:
    """``[n,3]`` uint8 distinct, saturated colours (golden-ratio hue steps)."""
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((0.61803 * i) % 1.0, 0.85, 1.0)]
                     for i in range(n)], np.uint8).reshape(n, 3)


def draw_instances(image: np.ndarray, masks: np.ndarray, scores: Sequence[float], names: Sequence[str],
                   alpha: float = 0.45) -> Image.Image:
    """``uint8 [H,W,3]`` image + ``bool [K,H,W]`` masks → RGB overlay: tinted masks, white-on-
    black contours (visible on any background) and a ``name score`` tag per instance."""
    out = image.astype(np.float32).copy()
    colours = palette(len(masks))
    for m, c in zip(masks, colours):
        out[m] = (1 - alpha) * out[m] + alpha * c
    out = out.clip(0, 255).astype(np.uint8)
    for m, c in zip(masks, colours):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 0, 0), 2)
        cv2.drawContours(out, contours, -1, tuple(int(v) for v in c), 1)
    img = Image.fromarray(out)
    d = ImageDraw.Draw(img)
    for m, s, name in zip(masks, scores, names):
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        text = f"{name} {float(s):.2f}"
        x, y = int(xs.min()), max(0, int(ys.min()) - 11)
        d.rectangle([x, y, x + 6 * len(text) + 2, y + 10], fill=(0, 0, 0))  # dark box: readable anywhere
        d.text((x + 1, y - 1), text, fill=(255, 255, 255))
    return img
