"""Pictures a person can read: CAM overlays at a readable size, with class names (PIL + numpy).

The CAM heat maps are ``clims_loss.overlay_cam``; label maps use the PASCAL VOC colours. Every tile is
scaled so that its height is ``size`` pixels (64-pixel images are enlarged, large ones reduced) and carries
a title; label colours come with a legend naming the classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import clims_loss as cl

#: The tile height of the eval_cam pictures when no other is given.
DEFAULT_TILE_SIZE = 192
_GAP = 6
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


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


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    colours: np.ndarray = label_palette()[labels]
    return colours


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, size // 14))


def _text_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    return int(font.getbbox("Hg")[3]) + 4


def tile(picture: np.ndarray, title: str, size: int, labels: bool = False) -> Image.Image:
    """``picture`` (H, W, 3) uint8 scaled to height ``size`` (nearest for label maps), under ``title``."""
    height, width = picture.shape[:2]
    new_width = max(1, round(width * size / height))
    resample = Image.Resampling.NEAREST if labels else Image.Resampling.BILINEAR
    scaled = Image.fromarray(picture).resize((new_width, size), resample)
    font = _font(size)
    band = _text_height(font)
    canvas = Image.new("RGB", (new_width, size + band), _WHITE)
    canvas.paste(scaled, (0, band))
    ImageDraw.Draw(canvas).text((2, 1), _fit(title, font, new_width - 4), fill=_BLACK, font=font)
    return canvas


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits ``width`` pixels."""
    while len(text) > 1 and font.getlength(text) > width:
        text = text[:-2] + "…"
    return text


def row(tiles: Sequence[Image.Image], caption: str = "", size: int = DEFAULT_TILE_SIZE) -> Image.Image:
    """Tiles side by side (tops aligned), with an optional caption line above them."""
    font = _font(size)
    band = _text_height(font) if caption else 0
    width = sum(t.width for t in tiles) + _GAP * (len(tiles) - 1)
    height = max(t.height for t in tiles) + band
    canvas = Image.new("RGB", (width, height), _WHITE)
    if caption:
        ImageDraw.Draw(canvas).text((2, 1), _fit(caption, font, width - 4), fill=_BLACK, font=font)
    x = 0
    for part in tiles:
        canvas.paste(part, (x, band))
        x += part.width + _GAP
    return canvas


def stack(rows: Sequence[Image.Image]) -> Image.Image:
    """Rows one under the other (left-aligned)."""
    canvas = Image.new(
        "RGB", (max(r.width for r in rows), sum(r.height for r in rows) + _GAP * (len(rows) - 1)), _WHITE
    )
    y = 0
    for part in rows:
        canvas.paste(part, (0, y))
        y += part.height + _GAP
    return canvas


def legend(labels: Sequence[int], class_names: Sequence[str], size: int = DEFAULT_TILE_SIZE) -> Image.Image:
    """Colour swatches with the names of ``labels`` (indices into ``class_names``, 0 = background)."""
    font = _font(size)
    swatch = _text_height(font)
    entries = [(int(label), class_names[int(label)]) for label in labels]
    widths = [swatch + 4 + int(font.getlength(name)) + 12 for _, name in entries]
    canvas = Image.new("RGB", (max(1, sum(widths)), swatch + 2), _WHITE)
    draw = ImageDraw.Draw(canvas)
    x = 0
    palette = label_palette()
    for (label, name), width in zip(entries, widths, strict=True):
        draw.rectangle(
            (x, 1, x + swatch - 2, swatch - 1), fill=tuple(int(c) for c in palette[label]), outline=_BLACK
        )
        draw.text((x + swatch + 2, 0), name, fill=_BLACK, font=font)
        x += width
    return canvas


def cam_overlay_panel(
    image: np.ndarray,
    maps: np.ndarray,
    keys: Sequence[int],
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
    threshold: float | None = None,
    size: int = DEFAULT_TILE_SIZE,
) -> Image.Image:
    """One image's picture.

    First row: the image | the max-over-classes CAM over it | the prediction | the ground truth. Second row:
    each labelled class's own CAM over the image, titled with its name. Last: a legend of the label colours.

    Args:
        image: (H, W, 3) uint8.
        maps: (n, H, W) CAMs in [0, 1] of the image's labelled classes ``keys`` (0-based foreground indices).
        prediction: (H, W) labels (0 background, ``k + 1`` class ``k``).
        ground_truth: (H, W) labels (255: void).
        class_names: background first, then the foreground classes.
    """
    strongest = maps.max(axis=0) if len(maps) else np.zeros(image.shape[:2], dtype=np.float32)
    at = "" if threshold is None else f" @ {threshold:.2f}"
    first = [
        tile(image, title or "image", size),
        tile(cl.overlay_cam(image, strongest), "CAM (max over classes)", size),
        tile(colorize_labels(prediction), f"prediction{at}", size, labels=True),
        tile(colorize_labels(ground_truth), "ground truth", size, labels=True),
    ]
    rows = [row(first)]
    if len(maps):
        per_class = [
            tile(
                cl.overlay_cam(image, np.clip(cam, 0.0, 1.0)),
                f"{class_names[k + 1]} (mean {float(cam.mean()):.2f})",
                size,
            )
            for k, cam in zip(keys, maps, strict=True)
        ]
        rows.append(row(per_class))
    shown = sorted(set(np.unique(prediction).tolist()) | (set(np.unique(ground_truth).tolist()) - {255}))
    rows.append(legend([label for label in shown if label < len(class_names)], class_names, size))
    return stack(rows)


def cam_overlay_grid(
    entries: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Sequence[int]]],
    class_names: Sequence[str],
    title: str,
    size: int = DEFAULT_TILE_SIZE,
) -> Image.Image:
    """One picture for a run: a row per image, ``(image id, image, max CAM, prediction, ground truth, its
    classes as 0-based foreground indices)``, each row image | CAM over it | prediction | ground truth,
    captioned with the id and the class names; a legend of every label shown at the bottom."""
    font = _font(size)
    heading = Image.new("RGB", (int(font.getlength(title)) + 8, _text_height(font)), _WHITE)
    ImageDraw.Draw(heading).text((2, 1), title, fill=_BLACK, font=font)
    rows = [heading]
    shown: set[int] = set()
    for image_id, image, strongest, prediction, ground_truth, keys in entries:
        tiles = [
            tile(image, "image", size),
            tile(cl.overlay_cam(image, strongest), "CAM", size),
            tile(colorize_labels(prediction), "prediction", size, labels=True),
            tile(colorize_labels(ground_truth), "ground truth", size, labels=True),
        ]
        names = ", ".join(class_names[k + 1] for k in keys) or "no class"
        rows.append(row(tiles, caption=f"{image_id}: {names}", size=size))
        shown |= set(np.unique(prediction).tolist()) | (set(np.unique(ground_truth).tolist()) - {255})
    rows.append(legend(sorted(label for label in shown if label < len(class_names)), class_names, size))
    return stack(rows)
