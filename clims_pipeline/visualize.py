"""Pictures: the VOC colour palette, a jet colour map and CAM overlay panels (PIL + numpy only)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def label_palette(size: int = 256) -> np.ndarray:
    """The PASCAL VOC label colours: the bits of the label index spread over R, G and B, high bits first."""
    palette = np.zeros((size, 3), dtype=np.uint8)
    for label in range(size):
        value, red, green, blue = label, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[label] = (red, green, blue)
    return palette


def jet(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, blue (0) through green to red (1)."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    channels = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    colours: np.ndarray = (255 * channels).astype(np.uint8)
    return colours


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    colours: np.ndarray = label_palette()[labels]
    return colours


def cam_overlay_panel(
    image: np.ndarray,
    cam_score: np.ndarray,
    prediction: np.ndarray,
    ground_truth: np.ndarray,
) -> Image.Image:
    """One row: image | max-over-classes CAM blended over the image | prediction | ground truth."""
    heat = (0.5 * image.astype(np.float32) + 0.5 * jet(cam_score).astype(np.float32)).astype(np.uint8)
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    row = np.concatenate(
        [image, gap, heat, gap, colorize_labels(prediction), gap, colorize_labels(ground_truth)], axis=1
    )
    return Image.fromarray(row)
