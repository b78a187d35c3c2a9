"""A procedural "toy world" for checking CLIMS on a CPU.

Images show 1-3 objects drawn over background textures. Every object class has "its" background
(boat - water, train - railroad, cow - grass, aeroplane - sky, car - road, bird - trees) and is placed
on it most of the time (``context_rate``, 0.9 by default), which reproduces the co-occurrence bias
that CLIMS' background suppression loss targets. Masks are exact (they come from the same shapes the
image is drawn with), image-level labels are read back from the masks, and every image has a
caption. Some captions name only the objects, some name the objects and the background, and the
background-only images name only the background. A CLIP trained on these captions therefore sees
water mostly next to the word "boat", but it also sees the word "water".

The world is written in the VOC layout the pipeline reads::

    root/
      JPEGImages/<id>.jpg               RGB (JPEG quality 95, no chroma subsampling; or PNG, see below)
      SegmentationClass/<id>.png        palette "P" PNG, 0 = background, 1..K = TOY_CLASSES, 255 = void
      SegmentationClassAug/<id>.png     the same masks (the pipeline trains on train_aug)
      ImageSets/Segmentation/*.txt      train_aug, train (a subset of train_aug, as in VOC), val,
                                        trainval, background_only_train, background_only_val
      cls_labels.json                   id -> sorted 1-based class list (VOC sample format)
      captions.jsonl                    one JSON object per image: id, split, caption, classes, backgrounds
      toyworld.json                     metadata (written last: its presence means "complete")

Images are written as ``.jpg`` by default because the pipeline's loader looks for ``<id>.jpg``. At
quality 95 with 4:4:4 chroma the mean absolute error against the rendered image was 2.8 grey levels
(of 255; mostly the per-pixel sensor noise; ``toyworld.json`` records the measured value), and masks
are exact regardless. ``image_format="png"`` writes lossless ``.png`` files instead, for loaders that
accept them.

Generation is deterministic: image ``i`` of split ``s`` is drawn from its own random stream seeded by
``(seed, s, i)``, so the result does not depend on the number of worker processes.

Run ``python -m clims_pipeline.toy --help`` for the
measurement entry point (generate, train the tiny CLIP, report zero-shot accuracy and the bias).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import atomic_write

TOY_CLASSES: tuple[str, ...] = ("aeroplane", "boat", "train", "cow", "car", "bird")
TOY_BACKGROUNDS: tuple[str, ...] = ("sky", "water", "railroad", "grass", "road", "trees")

# Each object class and the background it co-occurs with (the paper's boat - water, train - railroad).
CLASS_BACKGROUND: dict[str, str] = {
    "aeroplane": "sky",
    "boat": "water",
    "train": "railroad",
    "cow": "grass",
    "car": "road",
    "bird": "trees",
}

# Words a caption may use for a background. The first term is the canonical one; the list is also
# what the background prompts of the class-related background suppression loss are built from.
BACKGROUND_TERMS: dict[str, tuple[str, ...]] = {
    "sky": ("sky", "clouds"),
    "water": ("water", "sea", "lake", "river"),
    "railroad": ("railroad", "railway", "rails", "track"),
    "grass": ("grass", "meadow", "field"),
    "road": ("road", "street", "asphalt"),
    "trees": ("trees", "forest", "leaves"),
}

_PLURALS: dict[str, str] = {
    "aeroplane": "aeroplanes",
    "boat": "boats",
    "train": "trains",
    "cow": "cows",
    "car": "cars",
    "bird": "birds",
}
_NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three"}

# The sky is above the horizon; every other background is "ground" below it (or fills the frame).
_SKY = "sky"
_GROUND_BACKGROUNDS: tuple[str, ...] = tuple(b for b in TOY_BACKGROUNDS if b != _SKY)

_SPLIT_CODES: dict[str, int] = {
    "train_aug": 1,
    "val": 2,
    "background_only_train": 3,
    "background_only_val": 4,
}

FORMAT_VERSION = 2

# Object width as a fraction of the image side: (min, max). Trains are long, birds small.
_CLASS_SCALE: dict[str, tuple[float, float]] = {
    "aeroplane": (0.42, 0.62),
    "boat": (0.36, 0.52),
    "train": (0.55, 0.8),
    "cow": (0.36, 0.52),
    "car": (0.36, 0.52),
    "bird": (0.3, 0.42),
}
# Where, in an object's own unit coordinates (u right, v down, 1 unit = object width), the object
# touches its background: the bottom of hull, wheels and feet; the middle of flying things.
_CLASS_ANCHOR_V: dict[str, float] = {
    "aeroplane": 0.0,
    "boat": 0.16,
    "train": 0.17,
    "cow": 0.33,
    "car": 0.24,
    "bird": 0.0,
}
# Top and bottom of each drawing in the same unit coordinates (to keep objects inside the frame).
_CLASS_EXTENT_V: dict[str, tuple[float, float]] = {
    "aeroplane": (-0.22, 0.34),
    "boat": (-0.62, 0.16),
    "train": (-0.16, 0.17),
    "cow": (-0.26, 0.33),
    "car": (-0.25, 0.24),
    "bird": (-0.22, 0.15),
}
_CLASS_MAX_TILT_DEG: dict[str, float] = {
    "aeroplane": 15.0,
    "boat": 5.0,
    "train": 0.0,
    "cow": 4.0,
    "car": 0.0,
    "bird": 20.0,
}


# VOC colour map, so masks look like VOC masks in any viewer (index 255 = the VOC void colour).
def _voc_palette() -> list[int]:
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(8):
            r |= ((c >> 0) & 1) << (7 - shift)
            g |= ((c >> 1) & 1) << (7 - shift)
            b |= ((c >> 2) & 1) << (7 - shift)
            c >>= 3
        palette.extend((r, g, b))
    return palette


VOC_PALETTE: list[int] = _voc_palette()


# ----------------------------------------------------------------------------------------------------
# Small vectorised drawing helpers. Images are float32 (H, W, 3) in [0, 1].
# ----------------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys + 0.5, xs + 0.5


def _smooth_noise(
    rng: np.random.Generator, size: int, cells_y: int, cells_x: int | None = None
) -> np.ndarray:
    """Value noise: a (cells+1)^2 random lattice, bilinearly interpolated to (size, size), in [0, 1]."""
    cells_x = cells_y if cells_x is None else cells_x
    lattice = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    fy = np.linspace(0.0, cells_y, size, endpoint=False, dtype=np.float32)
    fx = np.linspace(0.0, cells_x, size, endpoint=False, dtype=np.float32)
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    ty, tx = (fy - iy)[:, None], (fx - ix)[None, :]
    # Smoothstep weights hide the lattice's grid lines.
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    top = lattice[iy][:, ix] * (1 - tx) + lattice[iy][:, ix + 1] * tx
    bottom = lattice[iy + 1][:, ix] * (1 - tx) + lattice[iy + 1][:, ix + 1] * tx
    noise: np.ndarray = top * (1 - ty) + bottom * ty
    return noise


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two colours (3,) by weights t (H, W) -> (H, W, 3)."""
    blend: np.ndarray = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    return blend


def _jitter_colour(rng: np.random.Generator, rgb: Sequence[float], amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def _texture_sky(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    top = _jitter_colour(rng, (0.3, 0.5, 0.88))
    bottom = _jitter_colour(rng, (0.68, 0.8, 0.96))
    image = _mix(top, bottom, ys / size)
    clouds = _smooth_noise(rng, size, 3, 5) * 0.7 + _smooth_noise(rng, size, 7) * 0.3
    cover = np.clip((clouds - rng.uniform(0.45, 0.7)) * 4.0, 0, 1)
    return image * (1 - cover[..., None]) + cover[..., None]


def _texture_water(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    deep = _jitter_colour(rng, (0.05, 0.25, 0.45))
    light = _jitter_colour(rng, (0.2, 0.5, 0.68))
    wavelength = rng.uniform(0.06, 0.1) * size
    wobble = _smooth_noise(rng, size, 2, 4) * 2.5
    waves = 0.5 + 0.5 * np.sin(2 * np.pi * (ys / wavelength + wobble) + xs * 0.05)
    image = _mix(deep, light, waves * 0.7 + _smooth_noise(rng, size, 4) * 0.3)
    glints = (waves > 0.93) & (_smooth_noise(rng, size, 8) > 0.55)
    image[glints] = np.clip(image[glints] + 0.35, 0, 1)
    return image


def _texture_railroad(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    gravel = _jitter_colour(rng, (0.48, 0.43, 0.38))
    image = gravel[None, None, :] * (0.75 + 0.5 * rng.random((size, size, 1), dtype=np.float32))
    sleeper = _jitter_colour(rng, (0.35, 0.22, 0.12))
    steel = _jitter_colour(rng, (0.78, 0.78, 0.8), 0.04)
    track_period = rng.uniform(0.3, 0.42) * size
    gauge = rng.uniform(0.09, 0.13) * size
    offset = rng.uniform(0, track_period)
    phase = np.mod(ys - offset, track_period)
    sleeper_period = rng.uniform(0.07, 0.1) * size
    sleepers = (phase < gauge + 3) & (
        np.mod(xs + rng.uniform(0, size), sleeper_period) < sleeper_period * 0.45
    )
    image[sleepers] = sleeper
    rail_width = max(1.0, size / 64)
    rails = (np.abs(phase - 1.5) < rail_width) | (np.abs(phase - gauge - 1.5) < rail_width)
    image[rails] = steel
    clipped: np.ndarray = np.clip(image, 0, 1)
    return clipped


def _texture_grass(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    dark = _jitter_colour(rng, (0.12, 0.38, 0.1))
    light = _jitter_colour(rng, (0.42, 0.68, 0.22))
    # Blades: noise stretched vertically (fine in x, coarse in y).
    blades = _smooth_noise(rng, size, max(2, size // 16), max(8, size // 2))
    patches = _smooth_noise(rng, size, 3)
    image = _mix(dark, light, 0.6 * blades + 0.4 * patches)
    flowers = rng.random((size, size)) < 0.004
    image[flowers] = _jitter_colour(rng, (0.95, 0.9, 0.3))
    return image


def _texture_road(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    asphalt = _jitter_colour(rng, (0.3, 0.3, 0.32), 0.05)
    image = asphalt[None, None, :] * (0.85 + 0.3 * rng.random((size, size, 1), dtype=np.float32))
    image = image * (0.9 + 0.2 * _smooth_noise(rng, size, 4)[..., None])
    paint = _jitter_colour(rng, (0.95, 0.92, 0.75) if rng.random() < 0.5 else (0.95, 0.95, 0.95), 0.03)
    lane_period = rng.uniform(0.3, 0.45) * size
    line_width = max(1.0, size / 64)
    lines = np.abs(np.mod(ys - rng.uniform(0, lane_period), lane_period) - lane_period / 2) < line_width
    dash_period = rng.uniform(0.15, 0.25) * size
    dashes = np.mod(xs + rng.uniform(0, size), dash_period) < dash_period * 0.55
    image[lines & dashes] = paint
    clipped: np.ndarray = np.clip(image, 0, 1)
    return clipped


def _texture_trees(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    dark = _jitter_colour(rng, (0.04, 0.18, 0.06))
    mid = _jitter_colour(rng, (0.12, 0.4, 0.12))
    light = _jitter_colour(rng, (0.45, 0.62, 0.2))
    leaves = _smooth_noise(rng, size, max(4, size // 8)) * 0.65 + _smooth_noise(rng, size, 3) * 0.35
    image = np.where((leaves < 0.5)[..., None], _mix(dark, mid, leaves * 2), _mix(mid, light, leaves * 2 - 1))
    trunk_period = rng.uniform(0.2, 0.35) * size
    trunks = np.abs(np.mod(xs + rng.uniform(0, size), trunk_period) - trunk_period / 2) < max(1.0, size / 40)
    trunks &= _smooth_noise(rng, size, 3) > 0.55
    image[trunks] = _jitter_colour(rng, (0.3, 0.2, 0.1))
    return image


_TEXTURES: dict[str, Callable[[np.random.Generator, int, np.ndarray, np.ndarray], np.ndarray]] = {
    "sky": _texture_sky,
    "water": _texture_water,
    "railroad": _texture_railroad,
    "grass": _texture_grass,
    "road": _texture_road,
    "trees": _texture_trees,
}


# ----------------------------------------------------------------------------------------------------
# Objects, drawn as layered parts in the object's own coordinates (u right, v down, 1 unit = width).
# ----------------------------------------------------------------------------------------------------


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _rect(u: np.ndarray, v: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _polygon(u: np.ndarray, v: np.ndarray, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Inside test for a convex polygon given in either winding order."""
    pts = np.asarray(points, np.float32)
    nxt = np.roll(pts, -1, axis=0)
    cross = (nxt[:, 0, None, None] - pts[:, 0, None, None]) * (v[None] - pts[:, 1, None, None]) - (
        nxt[:, 1, None, None] - pts[:, 1, None, None]
    ) * (u[None] - pts[:, 0, None, None])
    inside: np.ndarray = np.all(cross >= 0, axis=0) | np.all(cross <= 0, axis=0)
    return inside


Part = tuple[np.ndarray, np.ndarray]  # (mask (H, W) bool, colour (3,))

_BRIGHT_COLOURS = (
    (0.85, 0.12, 0.1),
    (0.1, 0.25, 0.8),
    (0.95, 0.8, 0.1),
    (0.95, 0.95, 0.95),
    (0.9, 0.45, 0.05),
    (0.55, 0.1, 0.6),
    (0.1, 0.1, 0.1),
)


def _pick(rng: np.random.Generator, colours: Sequence[Sequence[float]], amount: float = 0.06) -> np.ndarray:
    return _jitter_colour(rng, colours[int(rng.integers(len(colours)))], amount)


def _draw_aeroplane(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    body = _pick(rng, ((0.92, 0.92, 0.94), (0.75, 0.77, 0.8), (0.95, 0.95, 0.9)), 0.04)
    accent = _pick(rng, ((0.8, 0.1, 0.1), (0.1, 0.2, 0.7), (0.2, 0.2, 0.25)))
    window = np.array((0.15, 0.2, 0.3), np.float32)
    parts = [
        (_polygon(u, v, [(-0.02, 0.02), (0.14, 0.02), (-0.12, 0.34), (-0.24, 0.34)]), body * 0.85),
        (_ellipse(u, v, 0.0, 0.0, 0.5, 0.075), body),
        (_polygon(u, v, [(-0.04, -0.02), (0.1, -0.02), (-0.1, -0.2), (-0.2, -0.2)]), body * 0.9),
        (_polygon(u, v, [(-0.48, 0.0), (-0.34, 0.0), (-0.44, -0.22), (-0.52, -0.22)]), accent),
        (_ellipse(u, v, 0.41, -0.02, 0.05, 0.03), window),
    ]
    windows = (np.abs(v + 0.015) < 0.018) & (u > -0.3) & (u < 0.3) & (np.mod(u, 0.07) < 0.03)
    parts.append((windows, window))
    return parts


def _draw_boat(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    hull = _pick(rng, ((0.7, 0.12, 0.1), (0.45, 0.25, 0.12), (0.95, 0.95, 0.95), (0.1, 0.15, 0.4)))
    sail = _pick(rng, ((0.97, 0.97, 0.92), (0.95, 0.85, 0.6), (0.9, 0.3, 0.2)), 0.03)
    return [
        (_rect(u, v, -0.015, 0.015, -0.62, 0.0), np.array((0.3, 0.2, 0.1), np.float32)),
        (_polygon(u, v, [(0.03, -0.04), (0.03, -0.6), (0.36, -0.04)]), sail),
        (_polygon(u, v, [(-0.03, -0.04), (-0.03, -0.45), (-0.28, -0.04)]), sail * 0.92),
        (_polygon(u, v, [(-0.5, -0.03), (0.5, -0.03), (0.36, 0.16), (-0.38, 0.16)]), hull),
        (_rect(u, v, -0.5, 0.5, -0.03, 0.0), hull * 0.7 + 0.3),
    ]


def _draw_train(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    body = _pick(rng, ((0.8, 0.1, 0.1), (0.1, 0.3, 0.75), (0.95, 0.8, 0.1), (0.1, 0.5, 0.25)))
    window = np.array((0.12, 0.15, 0.22), np.float32)
    stripe = _pick(rng, ((0.95, 0.95, 0.95), (0.15, 0.15, 0.15)), 0.03)
    wheel = np.array((0.12, 0.12, 0.12), np.float32)
    parts = [
        (_polygon(u, v, [(-0.5, -0.16), (0.38, -0.16), (0.5, 0.0), (0.5, 0.12), (-0.5, 0.12)]), body),
        (_rect(u, v, -0.5, 0.5, 0.04, 0.07), stripe),
        (_polygon(u, v, [(0.39, -0.13), (0.46, -0.04), (0.39, -0.04)]), window),
    ]
    windows = (v > -0.12) & (v < -0.04) & (u > -0.46) & (u < 0.34) & (np.mod(u + 0.46, 0.11) < 0.07)
    parts.append((windows, window))
    for centre in (-0.38, -0.26, 0.22, 0.34):
        parts.append((_ellipse(u, v, centre, 0.13, 0.045, 0.045), wheel))
    return parts


def _draw_cow(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    spotted = rng.random() < 0.6
    hide = _jitter_colour(rng, (0.95, 0.95, 0.92) if spotted else (0.55, 0.32, 0.15), 0.04)
    dark = np.array((0.08, 0.07, 0.06), np.float32)
    legs = np.zeros_like(u, dtype=bool)
    for centre in (-0.26, -0.16, 0.14, 0.24):
        legs |= _rect(u, v, centre - 0.035, centre + 0.035, 0.05, 0.33)
    body = _ellipse(u, v, 0.0, 0.0, 0.33, 0.17)
    parts = [
        (legs, hide * 0.85),
        (body, hide),
        (_ellipse(u, v, 0.38, -0.1, 0.12, 0.085), hide * 0.95),
        (_ellipse(u, v, 0.46, -0.07, 0.05, 0.05), np.array((0.9, 0.6, 0.6), np.float32)),
        (
            _polygon(u, v, [(0.32, -0.17), (0.35, -0.26), (0.37, -0.16)]),
            np.array((0.85, 0.8, 0.6), np.float32),
        ),
        (_rect(u, v, -0.36, -0.33, -0.06, 0.14), hide * 0.7),
    ]
    if spotted:
        spots = np.zeros_like(body)
        for _ in range(int(rng.integers(3, 6))):
            spots |= _ellipse(
                u,
                v,
                rng.uniform(-0.25, 0.25),
                rng.uniform(-0.1, 0.1),
                rng.uniform(0.05, 0.1),
                rng.uniform(0.04, 0.08),
            )
        parts.append((spots & body, dark))
    return parts


def _draw_car(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    paint = _pick(rng, _BRIGHT_COLOURS)
    glass = np.array((0.55, 0.75, 0.9), np.float32)
    tyre = np.array((0.07, 0.07, 0.07), np.float32)
    hub = np.array((0.7, 0.7, 0.72), np.float32)
    lower = _rect(u, v, -0.5, 0.5, -0.04, 0.16) & ~(
        (_ellipse(u, v, -0.5, -0.04, 0.06, 0.06)) & (u < -0.44) & (v < 0.02)
    )
    parts = [
        (lower, paint),
        (_polygon(u, v, [(-0.3, -0.03), (0.3, -0.03), (0.18, -0.24), (-0.2, -0.24)]), paint),
        (_polygon(u, v, [(-0.25, -0.05), (-0.02, -0.05), (-0.02, -0.21), (-0.17, -0.21)]), glass),
        (_polygon(u, v, [(0.02, -0.05), (0.25, -0.05), (0.16, -0.21), (0.02, -0.21)]), glass),
        (_rect(u, v, 0.44, 0.5, 0.0, 0.05), np.array((0.98, 0.95, 0.6), np.float32)),
    ]
    for centre in (-0.29, 0.29):
        parts.append((_ellipse(u, v, centre, 0.14, 0.1, 0.1), tyre))
        parts.append((_ellipse(u, v, centre, 0.14, 0.04, 0.04), hub))
    return parts


def _draw_bird(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    plumage = _pick(rng, ((0.85, 0.1, 0.1), (0.1, 0.35, 0.85), (0.95, 0.8, 0.1), (0.95, 0.5, 0.1)))
    belly = np.clip(plumage * 0.5 + 0.5, 0, 1)
    return [
        (_polygon(u, v, [(-0.28, -0.02), (-0.5, -0.14), (-0.5, 0.08)]), plumage * 0.7),
        (_ellipse(u, v, 0.0, 0.0, 0.3, 0.15), plumage),
        (_ellipse(u, v, 0.02, 0.06, 0.2, 0.08), belly),
        (_ellipse(u, v, -0.05, -0.04, 0.19, 0.09), plumage * 0.65),
        (_ellipse(u, v, 0.28, -0.11, 0.12, 0.11), plumage),
        (
            _polygon(u, v, [(0.38, -0.14), (0.5, -0.09), (0.38, -0.06)]),
            np.array((0.95, 0.6, 0.1), np.float32),
        ),
        (_ellipse(u, v, 0.31, -0.14, 0.025, 0.025), np.array((0.02, 0.02, 0.02), np.float32)),
    ]


_DRAW: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray], list[Part]]] = {
    "aeroplane": _draw_aeroplane,
    "boat": _draw_boat,
    "train": _draw_train,
    "cow": _draw_cow,
    "car": _draw_car,
    "bird": _draw_bird,
}


# ----------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------


@dataclass
class ToyObject:
    """One placed object instance; ``context`` is the background under its anchor point."""

    class_name: str
    context: str
    visible_fraction: float = 1.0


@dataclass
class ToyScene:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: 0 background, 1..K classes, 255 void
    backgrounds: list[str]  # backgrounds visible in the image
    objects: list[ToyObject] = field(default_factory=list)

    @property
    def labels(self) -> list[int]:
        """Sorted 1-based class indices present in the mask (the VOC ``cls_labels`` convention)."""
        values = np.unique(self.mask)
        return [int(x) for x in values if 0 < x <= len(TOY_CLASSES)]


def _layout(
    rng: np.random.Generator,
    size: int,
    ys: np.ndarray,
    xs: np.ndarray,
    required: set[str],
    exact: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """Background index map (H, W) with every required background (at most sky + two grounds).

    Names are in index order. Unless ``exact``, a sky may be added above the ground and a ground below
    the sky, as real photos show more than the object's own background.
    """
    grounds = sorted(b for b in required if b != _SKY)
    rng.shuffle(grounds)
    has_sky = _SKY in required
    if exact:
        pass
    elif not grounds:
        # A flying-only scene: plain sky, or sky over some ground.
        grounds = (
            [] if rng.random() < 0.6 else [_GROUND_BACKGROUNDS[int(rng.integers(len(_GROUND_BACKGROUNDS)))]]
        )
        has_sky = True
    elif (not has_sky and len(grounds) == 1) or not has_sky:
        has_sky = rng.random() < 0.5
    names: list[str] = ([_SKY] if has_sky else []) + grounds
    index_map = np.zeros((size, size), np.int64)
    if not grounds:
        return index_map, names
    first_ground = 1 if has_sky else 0
    ground_map = np.full((size, size), first_ground, np.int64)
    if len(grounds) == 2:
        # Two grounds side by side with a wavy border (a shore, the edge of a field).
        border = (
            rng.uniform(0.35, 0.65) * size
            + np.sin(ys / size * rng.uniform(3, 7) + rng.uniform(0, 6)) * 0.06 * size
        )
        ground_map = np.where(xs < border, first_ground, first_ground + 1)
    if has_sky:
        horizon = rng.uniform(0.3, 0.55) * size + np.sin(
            xs / size * rng.uniform(2, 6) + rng.uniform(0, 6)
        ) * (rng.uniform(0, 0.05) * size)
        index_map = np.where(ys < horizon, 0, ground_map)
    else:
        index_map = ground_map
    return index_map, names


def _sample_classes(rng: np.random.Generator, context_rate: float) -> tuple[list[str], list[str]] | None:
    """Object classes (in drawing order) and the background each one is placed on; None = reject."""
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    classes = [TOY_CLASSES[int(rng.integers(len(TOY_CLASSES)))]]
    while len(classes) < count:
        if rng.random() < 0.4:
            classes.append(classes[int(rng.integers(len(classes)))])
        else:
            others = [c for c in TOY_CLASSES if c not in classes]
            classes.append(others[int(rng.integers(len(others)))])
    contexts = []
    for name in classes:
        own = CLASS_BACKGROUND[name]
        if rng.random() < context_rate:
            contexts.append(own)
        else:
            others = [b for b in TOY_BACKGROUNDS if b != own]
            contexts.append(others[int(rng.integers(len(others)))])
    ground_count = len({c for c in contexts if c != _SKY})
    if ground_count > 2:
        return None
    return classes, contexts


Texture = Callable[[np.random.Generator, int, np.ndarray, np.ndarray], np.ndarray]
Drawing = Callable[[np.random.Generator, np.ndarray, np.ndarray], list[Part]]


@dataclass(frozen=True)
class WorldKind:
    """What one kind of toy world draws, over the shared vocabulary (``TOY_CLASSES``, ``TOY_BACKGROUNDS``,
    ``CLASS_BACKGROUND``, the caption words) and the shared scene layout, placement and file layout.

    ``textures`` and ``drawings`` render each background and object class; ``scale`` is an object's width
    as a fraction of the image side (min, max); ``anchor_v``, ``extent_v`` and ``max_tilt_deg`` place a
    drawing (its own unit coordinates, 1 unit = its width: where it touches its background, its top and
    bottom, its largest tilt); ``sample_classes(rng, context_rate)`` picks a scene's objects (in drawing
    order) and the background each stands on, or None to draw again; ``context_rate`` is the kind's default
    share of objects on their own background."""

    name: str
    textures: dict[str, Texture]
    drawings: dict[str, Drawing]
    scale: dict[str, tuple[float, float]]
    anchor_v: dict[str, float]
    extent_v: dict[str, tuple[float, float]]
    max_tilt_deg: dict[str, float]
    sample_classes: Callable[[np.random.Generator, float], tuple[list[str], list[str]] | None]
    context_rate: float


FIRST_WORLD = WorldKind(
    name="first",
    textures=_TEXTURES,
    drawings=_DRAW,
    scale=_CLASS_SCALE,
    anchor_v=_CLASS_ANCHOR_V,
    extent_v=_CLASS_EXTENT_V,
    max_tilt_deg=_CLASS_MAX_TILT_DEG,
    sample_classes=_sample_classes,
    context_rate=0.9,
)
#: The world kinds by name (``toy_world.kind``); ``world_second`` adds "second" (the package imports it).
WORLD_KINDS: dict[str, WorldKind] = {FIRST_WORLD.name: FIRST_WORLD}
TOY_WORLD_KINDS: tuple[str, ...] = ("first", "second")


def world_kind(name: str) -> WorldKind:
    """The world kind called ``name``; a clear error for an unknown one."""
    if name not in TOY_WORLD_KINDS:
        raise ValueError(f"expected a toy world kind from {list(TOY_WORLD_KINDS)}, got {name!r}")
    # ``world_second`` registers "second"; the package imports it, so any import of this module has it.
    return WORLD_KINDS[name]


def render_scene(
    rng: np.random.Generator,
    image_size: int,
    *,
    context_rate: float = 0.9,
    void_border: int = 0,
    min_visible_fraction: float = 0.4,
    backgrounds_only: Sequence[str] | None = None,
    kind: WorldKind = FIRST_WORLD,
) -> ToyScene:
    """Draw one scene of the world ``kind``. With ``backgrounds_only`` the scene has exactly those
    backgrounds and no objects."""
    ys, xs = _grid(image_size)
    if backgrounds_only is not None:
        unknown = set(backgrounds_only) - set(TOY_BACKGROUNDS)
        if unknown:
            raise ValueError(f"expected backgrounds from {TOY_BACKGROUNDS}, got unknown {sorted(unknown)}")
        sampled = None
        required = set(backgrounds_only)
    else:
        sampled = None
        while sampled is None:
            sampled = kind.sample_classes(rng, context_rate)
        required = set(sampled[1])
    index_map, names = _layout(rng, image_size, ys, xs, required, exact=backgrounds_only is not None)
    canvas = np.zeros((image_size, image_size, 3), np.float32)
    for index, name in enumerate(names):
        region = index_map == index
        if region.any():
            canvas[region] = kind.textures[name](rng, image_size, ys, xs)[region]
    mask = np.zeros((image_size, image_size), np.uint8)
    objects: list[ToyObject] = []
    if sampled is not None:
        canvas, mask, objects = _place_objects(
            rng,
            image_size,
            ys,
            xs,
            canvas,
            index_map,
            names,
            *sampled,
            min_visible_fraction=min_visible_fraction,
            kind=kind,
        )
    if void_border > 0:
        mask = _add_void_border(mask, void_border)
    # Global photometric jitter: exposure and a slight colour cast, then sensor noise.
    gain = rng.uniform(0.85, 1.15) * (1 + rng.uniform(-0.06, 0.06, 3))
    canvas = canvas * gain.astype(np.float32) + rng.normal(0, 0.015, canvas.shape).astype(np.float32)
    image = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    visible = (
        [names[i] for i in np.unique(index_map[mask == 0]) if i < len(names)] if (mask == 0).any() else []
    )
    return ToyScene(image=image, mask=mask, backgrounds=visible, objects=objects)


def _place_objects(
    rng: np.random.Generator,
    size: int,
    ys: np.ndarray,
    xs: np.ndarray,
    canvas: np.ndarray,
    index_map: np.ndarray,
    names: list[str],
    classes: list[str],
    contexts: list[str],
    *,
    min_visible_fraction: float,
    kind: WorldKind,
    attempts: int = 8,
) -> tuple[np.ndarray, np.ndarray, list[ToyObject]]:
    best: tuple[np.ndarray, np.ndarray, list[ToyObject]] | None = None
    best_score = -1.0
    for _ in range(attempts):
        layer_canvas = canvas.copy()
        instance_map = np.full((size, size), -1, np.int64)
        full_areas = []
        for instance, (name, context) in enumerate(zip(classes, contexts, strict=True)):
            width = rng.uniform(*kind.scale[name]) * size
            # The anchor lies on the chosen background, and far enough from the frame's edges that at
            # most ~15% of the object is cut off (a caption should not name a train that is not there).
            v_top, v_bottom = kind.extent_v[name]
            anchor_v = kind.anchor_v[name]
            band = (
                (ys >= (anchor_v - v_top) * width * 0.85)
                & (ys <= size - (v_bottom - anchor_v) * width * 0.85)
                & (xs >= width * 0.42)
                & (xs <= size - width * 0.42)
            )
            on_background = index_map == names.index(context)
            region = np.flatnonzero(on_background & band)
            if len(region) == 0:  # a thin strip of background: accept a larger cut-off
                region = np.flatnonzero(on_background)
            anchor_y, anchor_column = divmod(int(region[int(rng.integers(len(region)))]), size)
            anchor_x = anchor_column + 0.5
            flip = -1.0 if rng.random() < 0.5 else 1.0
            tilt = math.radians(rng.uniform(-1, 1) * kind.max_tilt_deg[name])
            dx, dy = (xs - anchor_x) / width, (ys - (anchor_y + 0.5)) / width
            u = (dx * math.cos(tilt) + dy * math.sin(tilt)) * flip
            v = -dx * math.sin(tilt) + dy * math.cos(tilt) + anchor_v
            parts = kind.drawings[name](rng, u, v)
            # Later parts cover earlier ones: remember the topmost part per pixel, then colour once.
            part_of_pixel = np.full((size, size), -1, np.int64)
            for part_number, (part_mask, _) in enumerate(parts):
                part_of_pixel[part_mask] = part_number
            shape = part_of_pixel >= 0
            palette = np.stack([colour for _, colour in parts])
            # A soft top-to-bottom light fall-off gives the flat shapes some volume.
            shading = 1.05 - 0.25 * np.clip(v[shape] + 0.3, 0, 1)
            layer_canvas[shape] = palette[part_of_pixel[shape]] * shading[:, None]
            instance_map[shape] = instance
            full_areas.append(int(shape.sum()))
        visible = [
            (int((instance_map == i).sum()) / full_areas[i]) if full_areas[i] > 0 else 0.0
            for i in range(len(classes))
        ]
        score = min(visible)
        if score > best_score:
            mask = np.zeros((size, size), np.uint8)
            shown = instance_map >= 0
            class_of_instance = np.array([TOY_CLASSES.index(c) + 1 for c in classes], np.uint8)
            mask[shown] = class_of_instance[instance_map[shown]]
            objects = [
                ToyObject(c, ctx, frac) for c, ctx, frac in zip(classes, contexts, visible, strict=True)
            ]
            best, best_score = (np.clip(layer_canvas, 0, 1), mask, objects), score
        if score >= min_visible_fraction:
            break
    if best is None:
        raise RuntimeError("object placement produced no candidate")
    canvas, mask, objects = best
    return canvas, mask, [o for o in objects if o.visible_fraction > 0]


def _add_void_border(mask: np.ndarray, width: int) -> np.ndarray:
    """Mark pixels within ``width`` px of a label change as 255 (like VOC's object outlines)."""
    padded = np.pad(mask, width, mode="edge")
    size_y, size_x = mask.shape
    edge = np.zeros(mask.shape, bool)
    for oy in range(-width, width + 1):
        for ox in range(-width, width + 1):
            if oy == 0 and ox == 0:
                continue
            edge |= padded[width + oy : width + oy + size_y, width + ox : width + ox + size_x] != mask
    out: np.ndarray = mask.copy()
    out[edge] = 255
    return out


# ----------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _object_phrase(rng: np.random.Generator, classes: Sequence[str], bare_rate: float = 0.3) -> str:
    """ "a boat, two cows and an aeroplane"; sometimes bare class names ("boat and cow"), the form
    VOC label captions and the evaluator's "a photo of {}." prompts use."""
    counts: dict[str, int] = {}
    for name in classes:
        counts[name] = counts.get(name, 0) + 1
    names = list(counts)
    rng.shuffle(names)
    if rng.random() < bare_rate:
        pieces = names
    else:
        pieces = [
            _with_article(n) if counts[n] == 1 else f"{_NUMBER_WORDS[counts[n]]} {_PLURALS[n]}" for n in names
        ]
    return pieces[0] if len(pieces) == 1 else ", ".join(pieces[:-1]) + " and " + pieces[-1]


def _background_phrase(rng: np.random.Generator, backgrounds: Sequence[str]) -> str:
    terms = [BACKGROUND_TERMS[b][int(rng.integers(len(BACKGROUND_TERMS[b])))] for b in backgrounds]
    rng.shuffle(terms)
    return terms[0] if len(terms) == 1 else ", ".join(terms[:-1]) + " and " + terms[-1]


_OBJECT_TEMPLATES = ("a photo of {o}.", "{o}.", "a picture of {o}.", "an image with {o}.")
_OBJECT_BACKGROUND_TEMPLATES = (
    "a photo of {o} with {b}.",
    "{o} with {b}.",
    "a picture of {o} in front of {b}.",
    "{o} in front of {b}.",
)
_BACKGROUND_TEMPLATES = ("a photo of {b}.", "{b}.", "a picture of {b}.", "an image of {b}.")


def caption_scene(rng: np.random.Generator, scene: ToyScene, *, background_caption_rate: float = 0.5) -> str:
    """Caption naming the visible objects and sometimes the backgrounds; background-only scenes name those."""
    visible_classes = [o.class_name for o in scene.objects]
    if not visible_classes:
        backgrounds = scene.backgrounds or ["sky"]
        return _BACKGROUND_TEMPLATES[int(rng.integers(len(_BACKGROUND_TEMPLATES)))].format(
            b=_background_phrase(rng, backgrounds)
        )
    objects = _object_phrase(rng, visible_classes)
    if scene.backgrounds and rng.random() < background_caption_rate:
        template = _OBJECT_BACKGROUND_TEMPLATES[int(rng.integers(len(_OBJECT_BACKGROUND_TEMPLATES)))]
        return template.format(o=objects, b=_background_phrase(rng, scene.backgrounds))
    return _OBJECT_TEMPLATES[int(rng.integers(len(_OBJECT_TEMPLATES)))].format(o=objects)


# ----------------------------------------------------------------------------------------------------
# Writing the world
# ----------------------------------------------------------------------------------------------------


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))


def _sample_id(split: str, index: int) -> str:
    prefix = {
        "train_aug": "train",
        "val": "val",
        "background_only_train": "bgtrain",
        "background_only_val": "bgval",
    }
    return f"{prefix[split]}_{index:06d}"


@dataclass(frozen=True)
class _Job:
    root: str
    split: str
    start: int
    stop: int
    image_size: int
    seed: int
    image_format: str
    context_rate: float
    void_border: int
    background_caption_rate: float
    kind: str


def _render_one(
    split: str,
    index: int,
    *,
    seed: int,
    image_size: int,
    context_rate: float,
    void_border: int,
    background_caption_rate: float,
    kind: str,
) -> tuple[ToyScene, str]:
    rng = _image_rng(seed, split, index)
    style = world_kind(kind)
    if split.startswith("background_only"):
        # Balanced over backgrounds; a third of them also show the sky above the ground.
        name = TOY_BACKGROUNDS[index % len(TOY_BACKGROUNDS)]
        chosen = [name] if name == _SKY or rng.random() < 0.67 else [_SKY, name]
        scene = render_scene(rng, image_size, void_border=void_border, backgrounds_only=chosen, kind=style)
    else:
        scene = render_scene(rng, image_size, context_rate=context_rate, void_border=void_border, kind=style)
    return scene, caption_scene(rng, scene, background_caption_rate=background_caption_rate)


def _write_chunk(job: _Job) -> list[dict[str, Any]]:
    root = Path(job.root)
    records = []
    for index in range(job.start, job.stop):
        scene, caption = _render_one(
            job.split,
            index,
            seed=job.seed,
            image_size=job.image_size,
            context_rate=job.context_rate,
            void_border=job.void_border,
            background_caption_rate=job.background_caption_rate,
            kind=job.kind,
        )
        sample_id = _sample_id(job.split, index)
        image = Image.fromarray(scene.image, "RGB")
        if job.image_format == "jpg":
            image.save(root / "JPEGImages" / f"{sample_id}.jpg", quality=95, subsampling=0)
        else:
            image.save(root / "JPEGImages" / f"{sample_id}.png", compress_level=1)
        mask = Image.fromarray(scene.mask, "P")
        mask.putpalette(VOC_PALETTE)
        mask.save(root / "SegmentationClass" / f"{sample_id}.png", compress_level=1)
        mask.save(root / "SegmentationClassAug" / f"{sample_id}.png", compress_level=1)
        records.append(
            {
                "id": sample_id,
                "split": job.split,
                "caption": caption,
                "labels": scene.labels,
                "classes": sorted({o.class_name for o in scene.objects}, key=TOY_CLASSES.index),
                "backgrounds": scene.backgrounds,
                "objects": [[o.class_name, o.context, round(o.visible_fraction, 3)] for o in scene.objects],
            }
        )
    return records


def _config(
    n_train: int,
    n_val: int,
    n_train_eval: int,
    n_background_only: int,
    n_background_only_val: int,
    image_size: int,
    seed: int,
    image_format: str,
    context_rate: float,
    void_border: int,
    background_caption_rate: float,
    kind: str,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "n_train": n_train,
        "n_val": n_val,
        "n_train_eval": n_train_eval,
        "n_background_only": n_background_only,
        "n_background_only_val": n_background_only_val,
        "image_size": image_size,
        "seed": seed,
        "image_format": image_format,
        "context_rate": context_rate,
        "void_border": void_border,
        "background_caption_rate": background_caption_rate,
    }


#: The one default size of a toy world (the pipeline's, the ablation's and ``python -m clims_pipeline.toy``).
DEFAULT_N_TRAIN, DEFAULT_N_VAL = 4000, 500


def generate_toy_world(
    root: str | os.PathLike[str],
    *,
    n_train: int = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    image_size: int = 64,
    seed: int = 0,
    n_train_eval: int | None = None,
    n_background_only: int | None = None,
    n_background_only_val: int | None = None,
    image_format: str = "jpg",
    context_rate: float | None = None,
    void_border: int = 0,
    background_caption_rate: float = 0.5,
    num_workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    kind: str = "first",
) -> dict[str, Any]:
    """Write the toy world to ``root`` in the VOC layout and return its metadata (also in toyworld.json).

    ``kind`` chooses what is drawn (``WORLD_KINDS``: "first", the world of docs/toyworld.md, or "second",
    ``world_second``); ``context_rate`` defaults to the kind's own.

    ``n_train`` images form ``train_aug``; the first ``n_train_eval`` of them (default min(n_train, 1000))
    form ``train``, the split CAM quality is measured on, as VOC's train is a subset of train_aug.
    ``n_background_only`` (default n_train // 12) object-free images join the CLIP training captions;
    ``n_background_only_val`` (default 40 per background) are held out to measure the co-occurrence bias.
    If ``root`` already holds a complete world with the same settings it is reused, unless ``overwrite``.
    """
    if image_size < 32 or image_size > 512:
        raise ValueError(f"expected image_size in [32, 512], got {image_size}")
    if n_train < 1 or n_val < 0:
        raise ValueError(f"expected n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"expected image_format 'jpg' or 'png', got {image_format!r}")
    style = world_kind(kind)
    context_rate = style.context_rate if context_rate is None else context_rate
    if not 0.0 <= context_rate <= 1.0:
        raise ValueError(f"expected context_rate in [0, 1], got {context_rate}")
    n_train_eval = min(n_train, 1000) if n_train_eval is None else min(n_train_eval, n_train)
    n_background_only = n_train // 12 if n_background_only is None else n_background_only
    n_background_only_val = (
        40 * len(TOY_BACKGROUNDS) if n_background_only_val is None else n_background_only_val
    )
    config = _config(
        n_train,
        n_val,
        n_train_eval,
        n_background_only,
        n_background_only_val,
        image_size,
        seed,
        image_format,
        context_rate,
        void_border,
        background_caption_rate,
        kind,
    )
    root = Path(root)
    metadata_path = root / "toyworld.json"
    if metadata_path.exists() and not overwrite:
        existing: dict[str, Any] = json.loads(metadata_path.read_text())
        # Worlds written before there were kinds are first worlds.
        if {"kind": "first", **existing.get("config", {})} == config:
            return existing
    started = time.perf_counter()
    if metadata_path.exists():
        metadata_path.unlink()  # the world is incomplete until the metadata is written again
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    counts = {
        "train_aug": n_train,
        "val": n_val,
        "background_only_train": n_background_only,
        "background_only_val": n_background_only_val,
    }
    chunk = 250
    jobs = [
        _Job(
            str(root),
            split,
            start,
            min(start + chunk, count),
            image_size,
            seed,
            image_format,
            context_rate,
            void_border,
            background_caption_rate,
            kind,
        )
        for split, count in counts.items()
        for start in range(0, count, chunk)
    ]
    records: list[dict[str, Any]] = []
    bar = _progress(sum(counts.values()), "toy world", progress)
    if num_workers > 1:
        with multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(num_workers) as pool:
            for result in pool.imap(_write_chunk, jobs):
                records.extend(result)
                bar.update(len(result))
    else:
        for job in jobs:
            result = _write_chunk(job)
            records.extend(result)
            bar.update(len(result))
    bar.close()

    by_split: dict[str, list[str]] = {split: [] for split in counts}
    for record in records:
        by_split[record["split"]].append(record["id"])
    lists = {
        "train_aug": by_split["train_aug"],
        "train": by_split["train_aug"][:n_train_eval],
        "val": by_split["val"],
        "trainval": by_split["train_aug"][:n_train_eval] + by_split["val"],
        "background_only_train": by_split["background_only_train"],
        "background_only_val": by_split["background_only_val"],
    }
    for name, ids in lists.items():
        _write_text_atomic(
            root / "ImageSets" / "Segmentation" / f"{name}.txt", "".join(f"{i}\n" for i in ids)
        )
    _write_text_atomic(
        root / "cls_labels.json", json.dumps({r["id"]: r["labels"] for r in records}, indent=0)
    )
    _write_text_atomic(root / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    metadata = {
        "config": config,
        "kind": kind,
        "classes": list(TOY_CLASSES),
        "backgrounds": list(TOY_BACKGROUNDS),
        "class_background": dict(CLASS_BACKGROUND),
        "background_terms": {k: list(v) for k, v in BACKGROUND_TERMS.items()},
        "image_ext": f".{image_format}",
        "splits": {name: len(ids) for name, ids in lists.items()},
        "statistics": measure_statistics(records),
        "jpeg_mean_abs_error": _jpeg_error(
            root, records, seed, image_size, context_rate, void_border, background_caption_rate, kind
        )
        if image_format == "jpg"
        else 0.0,
        "generation_seconds": round(time.perf_counter() - started, 2),
        "num_workers": num_workers,
        "prompts": toy_prompts(),
    }
    _write_text_atomic(metadata_path, json.dumps(metadata, indent=2))
    return metadata


def _progress(total: int, description: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional here; progress is a nicety
        enabled = False
    if not enabled:

        class _Silent:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...

        return _Silent()
    return tqdm(total=total, desc=description, unit="img")


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def _jpeg_error(
    root: Path,
    records: list[dict[str, Any]],
    seed: int,
    image_size: int,
    context_rate: float,
    void_border: int,
    background_caption_rate: float,
    kind: str,
    sample: int = 50,
) -> float:
    """Mean absolute error (grey levels) of the stored JPEGs against a re-render of the same images."""
    errors = []
    for record in records[:sample]:
        index = int(record["id"].rsplit("_", 1)[1])
        scene, _ = _render_one(
            record["split"],
            index,
            seed=seed,
            image_size=image_size,
            context_rate=context_rate,
            void_border=void_border,
            background_caption_rate=background_caption_rate,
            kind=kind,
        )
        stored = np.asarray(
            Image.open(root / "JPEGImages" / f"{record['id']}.jpg").convert("RGB"), np.float32
        )
        errors.append(float(np.abs(stored - scene.image.astype(np.float32)).mean()))
    return round(float(np.mean(errors)), 3) if errors else 0.0


def measure_statistics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Co-occurrence and label statistics of the object images (background-only images excluded).

    ``instance_context_rate[c]``: fraction of class-c instances placed on c's own background.
    ``image_context_rate[c]``: fraction of images containing c in which c's background is visible.
    """
    instances = {c: [0, 0] for c in TOY_CLASSES}
    images = {c: [0, 0] for c in TOY_CLASSES}
    objects_per_image: dict[int, int] = {}
    classes_per_image: dict[int, int] = {}
    for record in records:
        if record["split"].startswith("background_only"):
            continue
        for class_name, context, _ in record["objects"]:
            instances[class_name][0] += context == CLASS_BACKGROUND[class_name]
            instances[class_name][1] += 1
        for class_name in record["classes"]:
            images[class_name][0] += CLASS_BACKGROUND[class_name] in record["backgrounds"]
            images[class_name][1] += 1
        objects_per_image[len(record["objects"])] = objects_per_image.get(len(record["objects"]), 0) + 1
        classes_per_image[len(record["classes"])] = classes_per_image.get(len(record["classes"]), 0) + 1
    rate = {c: round(hit / total, 4) if total else float("nan") for c, (hit, total) in instances.items()}
    image_rate = {c: round(hit / total, 4) if total else float("nan") for c, (hit, total) in images.items()}
    return {
        "instance_context_rate": rate,
        "image_context_rate": image_rate,
        "min_instance_context_rate": min(rate.values()),
        "min_image_context_rate": min(image_rate.values()),
        "images_per_class": {c: total for c, (_, total) in images.items()},
        "objects_per_image": dict(sorted(objects_per_image.items())),
        "classes_per_image": dict(sorted(classes_per_image.items())),
    }


# ----------------------------------------------------------------------------------------------------
# Reading the world back, prompts, background-only helpers
# ----------------------------------------------------------------------------------------------------


def toy_prompts(template: str = "a photo of {}.") -> dict[str, Any]:
    """Class names, prompt templates and each class's co-occurring background terms, as plain data.

    The keys are ``BackgroundPromptRegistry``'s field names, so ``BackgroundPromptRegistry(**toy_prompts())``
    builds the registry; ``class_backgrounds`` maps each class to the words the captions use for its
    background, e.g. ``{"boat": ["water", "sea", "lake", "river"], ...}``.
    """
    return {
        "name": "toy",
        "class_names": list(TOY_CLASSES),
        "template": template,
        "background_template": template,
        "class_backgrounds": {c: list(BACKGROUND_TERMS[CLASS_BACKGROUND[c]]) for c in TOY_CLASSES},
    }


def load_toy_world(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata of a complete toy world; raises if ``root`` holds none (or an unfinished one)."""
    path = Path(root) / "toyworld.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no complete toy world at {root} (missing {path.name}); run generate_toy_world"
        )
    metadata: dict[str, Any] = json.loads(path.read_text())
    return metadata


def world_settings(root: str | os.PathLike[str]) -> tuple[str, float]:
    """The kind and context rate a stored world was generated with (worlds older than kinds are first)."""
    config = load_toy_world(root)["config"]
    return str(config.get("kind", "first")), float(config["context_rate"])


def read_captions(root: str | os.PathLike[str], splits: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Caption records of ``captions.jsonl``, optionally only those of the given splits."""
    records = []
    with open(Path(root) / "captions.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if splits is None or record["split"] in splits:
                records.append(record)
    return records


def image_path(root: str | os.PathLike[str], sample_id: str) -> Path:
    """Path of a sample's image, whichever format the world was written in."""
    root = Path(root)
    for ext in (".jpg", ".png"):
        candidate = root / "JPEGImages" / f"{sample_id}{ext}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no image for id {sample_id!r} under {root / 'JPEGImages'}")


def background_only_images(
    root: str | os.PathLike[str], split: str = "background_only_val"
) -> Iterator[tuple[str, str, Path]]:
    """(id, background, image path) of the stored background-only images with a single background.

    These measure the co-occurrence bias: how much a CLIP says "boat" to water alone.
    """
    for record in read_captions(root, [split]):
        if len(record["backgrounds"]) == 1:
            yield record["id"], record["backgrounds"][0], image_path(root, record["id"])


def render_background_only(
    background: str, count: int, *, image_size: int = 64, seed: int = 0, kind: str = "first"
) -> np.ndarray:
    """``count`` freshly rendered full-frame images of one background, uint8 (count, H, W, 3), in memory."""
    if background not in TOY_BACKGROUNDS:
        raise ValueError(f"expected a background from {TOY_BACKGROUNDS}, got {background!r}")
    style = world_kind(kind)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 99, TOY_BACKGROUNDS.index(background)]))
    images = [
        render_scene(rng, image_size, backgrounds_only=[background], kind=style).image for _ in range(count)
    ]
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)


def render_object_cutouts(
    count: int, *, image_size: int = 64, seed: int = 0, context_rate: float | None = None, kind: str = "first"
) -> tuple[np.ndarray, list[str]]:
    """``count`` fresh scenes with everything but their objects blacked out, and object-only captions.

    The stand-in for the isolated objects of a web-scale caption corpus (product shots, cut-outs,
    objects on plain backgrounds): they teach a CLIP trained on this world what the object itself looks
    like, on the black fill the evaluator's masked views show. They are rendered apart from every split
    (their own seed stream) and never enter the segmentation data. Returns uint8 (count, H, W, 3) and
    the captions. ``kind`` is the world kind they are drawn from; ``context_rate`` defaults to its own.
    """
    style = world_kind(kind)
    rate = style.context_rate if context_rate is None else context_rate
    images = np.zeros((count, image_size, image_size, 3), np.uint8)
    captions = []
    for index in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 98, index]))
        scene = render_scene(rng, image_size, context_rate=rate, kind=style)
        images[index] = scene.image * (scene.mask > 0)[..., None]
        phrase = _object_phrase(rng, [o.class_name for o in scene.objects])
        captions.append(_OBJECT_TEMPLATES[int(rng.integers(len(_OBJECT_TEMPLATES)))].format(o=phrase))
    return images, captions


def render_background_captions(
    count: int, *, image_size: int = 64, seed: int = 0, kind: str = "first"
) -> tuple[np.ndarray, list[str]]:
    """``count`` fresh full-frame background images (balanced over backgrounds) with background captions.

    More of the object-free pictures a web corpus is full of (a lake, a field, a road) than the world's
    own ``background_only_train`` split; like the cut-outs, for CLIP training only. ``kind``: the world
    kind they are drawn from.
    """
    style = world_kind(kind)
    images = np.zeros((count, image_size, image_size, 3), np.uint8)
    captions = []
    for index in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 97, index]))
        background = TOY_BACKGROUNDS[index % len(TOY_BACKGROUNDS)]
        images[index] = render_scene(rng, image_size, backgrounds_only=[background], kind=style).image
        template = _BACKGROUND_TEMPLATES[int(rng.integers(len(_BACKGROUND_TEMPLATES)))]
        captions.append(template.format(b=_background_phrase(rng, [background])))
    return images, captions
