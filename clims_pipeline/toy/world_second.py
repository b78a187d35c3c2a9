"""The second toy world: the same six classes and backgrounds as the first, drawn and composed otherwise.

It exists to check that the toy recipe (``apply_toy_preset``) transfers to a world it was not tuned on
(docs/toyworld.md, "A second world"). Against the first world (``world.py``) it differs in kind:

* **Other shapes and textures.** A biplane instead of an airliner, a motor ship with a funnel instead of a
  sailing boat, a steam locomotive instead of a modern train, a shaggy horned cow, a round bubble car, a
  gliding gull with raised wings; objects carry patterns (checked wings, hull bands, boiler rings, hair
  streaks, barred feathers). Backgrounds are a dusk sky, a rippled green lake, red ballast with concrete
  sleepers, dry mown grass, cobblestones and autumn foliage.
* **Smaller objects.** Widths of 16-45 % of the image side (the first world: 30-80 %).
* **Another co-occurrence rate.** 0.75 by default (the first world: 0.9).
* **One object class per image as well as several.** 60 % of the images show a single class, often as a
  group (a herd, a flock, a queue of cars: up to three of a kind); up to five objects in all.

The vocabulary (class and background names, caption words, prompts), the scene layout (sky over at most
two grounds), object placement, captions and the files written are the first world's (``world.py``), so
the pipeline, the CLIP corpus and the prompt registry read both alike. Select it with
``--set toy_world.kind=second`` or ``generate_toy_world(root, kind="second")``.
"""

from __future__ import annotations

import numpy as np

from .world import (
    _GROUND_BACKGROUNDS,
    CLASS_BACKGROUND,
    TOY_BACKGROUNDS,
    TOY_CLASSES,
    WORLD_KINDS,
    Drawing,
    Part,
    Texture,
    WorldKind,
    _ellipse,
    _jitter_colour,
    _mix,
    _pick,
    _polygon,
    _rect,
    _smooth_noise,
)

SECOND_CONTEXT_RATE = 0.75

# ----------------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------------


def _texture_dusk_sky(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    top = _jitter_colour(rng, (0.25, 0.18, 0.45))
    bottom = _jitter_colour(rng, (0.98, 0.6, 0.3))
    image = _mix(top, bottom, np.clip(ys / size * 1.6, 0, 1))
    # Thin horizontal cloud streaks, lit from below.
    streaks = _smooth_noise(rng, size, max(8, size // 4), 2)
    cover = np.clip((streaks - rng.uniform(0.6, 0.75)) * 5.0, 0, 1)
    lit = _jitter_colour(rng, (0.95, 0.45, 0.5))
    image = image * (1 - cover[..., None]) + lit[None, None, :] * cover[..., None]
    if rng.random() < 0.5:
        sun = (ys - rng.uniform(0.2, 0.6) * size) ** 2 + (xs - rng.uniform(0, size)) ** 2
        image[sun < (rng.uniform(0.04, 0.08) * size) ** 2] = _jitter_colour(rng, (1.0, 0.9, 0.6), 0.03)
    return image


def _texture_lake(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    dark = _jitter_colour(rng, (0.05, 0.3, 0.25))
    light = _jitter_colour(rng, (0.3, 0.6, 0.5))
    image = _mix(dark, light, _smooth_noise(rng, size, 3) * 0.6)
    # Rings of ripples around a few drops.
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0, size, 2)
        distance = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
        period = rng.uniform(0.05, 0.08) * size
        rings = (np.mod(distance, period) < period * 0.3) & (distance < rng.uniform(0.2, 0.4) * size)
        image[rings] = np.clip(image[rings] + 0.18, 0, 1)
    return image


def _texture_red_ballast(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    ballast = _jitter_colour(rng, (0.55, 0.3, 0.22))
    image = ballast[None, None, :] * (0.7 + 0.6 * rng.random((size, size, 1), dtype=np.float32))
    concrete = _jitter_colour(rng, (0.75, 0.74, 0.7), 0.04)
    rust = _jitter_colour(rng, (0.3, 0.2, 0.15), 0.04)
    track_period = rng.uniform(0.35, 0.5) * size
    gauge = rng.uniform(0.1, 0.14) * size
    phase = np.mod(ys - rng.uniform(0, track_period), track_period)
    sleeper_period = rng.uniform(0.1, 0.14) * size
    sleepers = (phase > 0.5) & (phase < gauge + 2.5)
    sleepers &= np.mod(xs + rng.uniform(0, size), sleeper_period) < sleeper_period * 0.3
    image[sleepers] = concrete
    rail_width = max(1.0, size / 48)
    rails = (np.abs(phase - 1.0) < rail_width) | (np.abs(phase - gauge - 1.0) < rail_width)
    image[rails] = rust
    clipped: np.ndarray = np.clip(image, 0, 1)
    return clipped


def _texture_dry_grass(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    straw = _jitter_colour(rng, (0.78, 0.68, 0.35))
    olive = _jitter_colour(rng, (0.55, 0.55, 0.22))
    # Mown stripes: broad diagonal bands of alternating light.
    period = rng.uniform(0.2, 0.3) * size
    angle = rng.uniform(-0.6, 0.6)
    bands = (np.mod(xs * np.cos(angle) + ys * np.sin(angle), period) < period / 2).astype(np.float32)
    image = _mix(olive, straw, 0.55 * bands + 0.45 * _smooth_noise(rng, size, max(4, size // 6)))
    return image


def _texture_cobbles(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    stone = _jitter_colour(rng, (0.55, 0.5, 0.45))
    joint = _jitter_colour(rng, (0.2, 0.18, 0.16), 0.03)
    cell = rng.uniform(0.08, 0.11) * size
    row = np.floor(ys / cell)
    shifted = xs + (np.mod(row, 2) * cell / 2)
    fy, fx = np.mod(ys, cell) / cell - 0.5, np.mod(shifted, cell) / cell - 0.5
    inside = fy**2 + fx**2 < 0.16
    shade = rng.uniform(0.75, 1.15, (int(size / cell) + 2, int(size / cell) + 3)).astype(np.float32)
    image = (
        stone[None, None, :]
        * shade[row.astype(np.int64), np.floor(shifted / cell).astype(np.int64)][..., None]
    )
    image[~inside] = joint
    clipped: np.ndarray = np.clip(image, 0, 1)
    return clipped


def _texture_autumn(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    colours = [
        _jitter_colour(rng, (0.85, 0.35, 0.08)),
        _jitter_colour(rng, (0.7, 0.12, 0.08)),
        _jitter_colour(rng, (0.92, 0.72, 0.15)),
        _jitter_colour(rng, (0.45, 0.25, 0.1)),
    ]
    leaves = _smooth_noise(rng, size, max(4, size // 6)) * 0.7 + _smooth_noise(rng, size, 2) * 0.3
    index = np.clip((leaves * len(colours)).astype(np.int64), 0, len(colours) - 1)
    image = np.stack(colours)[index] * (0.85 + 0.3 * rng.random((size, size, 1), dtype=np.float32))
    clipped: np.ndarray = np.clip(image, 0, 1)
    return clipped


_TEXTURES: dict[str, Texture] = {
    "sky": _texture_dusk_sky,
    "water": _texture_lake,
    "railroad": _texture_red_ballast,
    "grass": _texture_dry_grass,
    "road": _texture_cobbles,
    "trees": _texture_autumn,
}

# ----------------------------------------------------------------------------------------------------
# Objects (u right, v down, 1 unit = the object's width; as in world.py)
# ----------------------------------------------------------------------------------------------------

_DARK = np.array((0.08, 0.08, 0.08), np.float32)


def _checks(u: np.ndarray, v: np.ndarray, cell: float) -> np.ndarray:
    checks: np.ndarray = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    return checks


def _draw_biplane(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    body = _pick(rng, ((0.85, 0.15, 0.1), (0.95, 0.8, 0.15), (0.2, 0.45, 0.2), (0.15, 0.25, 0.6)))
    accent = _pick(rng, ((0.95, 0.95, 0.95), (0.1, 0.1, 0.1)), 0.03)
    wings = _rect(u, v, -0.12, 0.2, -0.22, -0.16) | _rect(u, v, -0.08, 0.22, 0.06, 0.12)
    parts = [
        (_rect(u, v, 0.0, 0.02, -0.16, 0.06) | _rect(u, v, 0.13, 0.15, -0.16, 0.06), _DARK),
        (_polygon(u, v, [(-0.5, -0.03), (0.36, -0.07), (0.42, 0.0), (0.36, 0.06), (-0.5, 0.02)]), body),
        (_polygon(u, v, [(-0.5, -0.01), (-0.4, -0.01), (-0.47, -0.2)]), body * 0.8),
        (wings, body * 0.9),
        (wings & _checks(u, v, 0.045), accent),
        (_rect(u, v, 0.43, 0.46, -0.15, 0.15), _DARK),
        (_rect(u, v, 0.04, 0.06, 0.06, 0.2), _DARK),
        (_ellipse(u, v, 0.05, 0.2, 0.045, 0.045), _DARK),
    ]
    return parts


def _draw_ship(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    hull = _pick(rng, ((0.1, 0.1, 0.12), (0.12, 0.2, 0.45), (0.55, 0.1, 0.1)))
    band = _pick(rng, ((0.95, 0.95, 0.95), (0.9, 0.2, 0.15)), 0.03)
    cabin = _pick(rng, ((0.95, 0.95, 0.9), (0.9, 0.85, 0.7)), 0.03)
    funnel = _pick(rng, ((0.9, 0.5, 0.1), (0.85, 0.15, 0.1), (0.95, 0.8, 0.1)))
    body = _polygon(u, v, [(-0.5, -0.06), (0.5, -0.09), (0.4, 0.1), (-0.45, 0.1)])
    parts = [
        (body, hull),
        (body & (v > 0.01) & (v < 0.04), band),
        (_rect(u, v, -0.3, 0.16, -0.21, -0.06), cabin),
        (_rect(u, v, -0.18, 0.06, -0.3, -0.21), cabin * 0.92),
        (_rect(u, v, -0.06, 0.04, -0.42, -0.3), funnel),
        (_rect(u, v, -0.06, 0.04, -0.42, -0.38), _DARK),
    ]
    portholes = np.zeros_like(body)
    for centre in np.arange(-0.24, 0.12, 0.08):
        portholes |= _ellipse(u, v, float(centre), -0.135, 0.025, 0.03)
    parts.append((portholes, np.array((0.1, 0.2, 0.35), np.float32)))
    return parts


def _draw_locomotive(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    body = _pick(rng, ((0.08, 0.08, 0.08), (0.1, 0.3, 0.15), (0.45, 0.08, 0.1)))
    brass = np.array((0.85, 0.68, 0.2), np.float32)
    wheel = _pick(rng, ((0.75, 0.1, 0.1), (0.2, 0.2, 0.2)), 0.03)
    boiler = _rect(u, v, -0.16, 0.42, -0.16, 0.05) | _ellipse(u, v, 0.42, -0.055, 0.05, 0.105)
    parts = [
        (boiler, body),
        (boiler & (np.mod(u, 0.12) < 0.025), brass),
        (_rect(u, v, -0.5, -0.14, -0.3, 0.06), body * 0.9),
        (_rect(u, v, -0.42, -0.24, -0.25, -0.12), np.array((0.9, 0.8, 0.5), np.float32)),
        (_rect(u, v, -0.53, -0.11, -0.35, -0.3), _DARK),
        (_rect(u, v, 0.28, 0.36, -0.36, -0.16), _DARK),
        (_polygon(u, v, [(0.42, 0.02), (0.5, 0.2), (0.36, 0.2)]), np.array((0.6, 0.6, 0.6), np.float32)),
    ]
    for centre in (-0.32, -0.06, 0.2):
        parts.append((_ellipse(u, v, centre, 0.1, 0.1, 0.1), wheel))
        parts.append((_ellipse(u, v, centre, 0.1, 0.03, 0.03), brass))
    return parts


def _draw_highland_cow(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    hair = _pick(rng, ((0.75, 0.38, 0.12), (0.15, 0.12, 0.1), (0.88, 0.8, 0.62)), 0.04)
    horn = np.array((0.9, 0.85, 0.7), np.float32)
    legs = np.zeros_like(u, dtype=bool)
    for centre in (-0.24, -0.12, 0.12, 0.24):
        legs |= _rect(u, v, centre - 0.045, centre + 0.045, 0.08, 0.28)
    body = _ellipse(u, v, 0.0, -0.02, 0.36, 0.17)
    head = _ellipse(u, v, 0.38, 0.0, 0.12, 0.1)
    shaggy = body | head
    parts = [
        (legs, hair * 0.7),
        (_rect(u, v, -0.4, -0.36, -0.05, 0.15), hair * 0.8),
        (body, hair),
        (head, hair * 0.95),
        (_polygon(u, v, [(0.3, -0.06), (0.24, -0.22), (0.28, -0.23), (0.34, -0.07)]), horn),
        (_polygon(u, v, [(0.44, -0.07), (0.5, -0.23), (0.54, -0.21), (0.48, -0.05)]), horn),
        (shaggy & (np.mod(u + 0.4 * v, 0.05) < 0.017), hair * 0.6),
        (_ellipse(u, v, 0.44, 0.06, 0.05, 0.035), np.array((0.25, 0.15, 0.12), np.float32)),
    ]
    return parts


def _draw_bubble_car(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    paint = _pick(rng, ((0.6, 0.9, 0.75), (0.95, 0.9, 0.7), (0.55, 0.75, 0.95), (0.95, 0.6, 0.7)), 0.04)
    trim = _pick(rng, ((0.95, 0.95, 0.95), (0.85, 0.2, 0.15)), 0.03)
    dome = _ellipse(u, v, 0.0, 0.06, 0.5, 0.33) & (v <= 0.13)
    parts = [
        (dome, paint),
        (dome & (v > 0.02) & (v < 0.06) & _checks(u, v, 0.04), trim),
        (_ellipse(u, v, 0.04, -0.08, 0.24, 0.13) & (v < -0.02), np.array((0.35, 0.45, 0.55), np.float32)),
        (_rect(u, v, 0.02, 0.05, -0.21, -0.02), paint * 0.85),
        (_ellipse(u, v, 0.45, 0.03, 0.035, 0.035), np.array((1.0, 0.95, 0.6), np.float32)),
    ]
    for centre in (-0.3, 0.3):
        parts.append((_ellipse(u, v, centre, 0.12, 0.1, 0.1), _DARK))
        parts.append((_ellipse(u, v, centre, 0.12, 0.06, 0.06), np.array((0.95, 0.95, 0.95), np.float32)))
        parts.append((_ellipse(u, v, centre, 0.12, 0.03, 0.03), np.array((0.6, 0.6, 0.62), np.float32)))
    return parts


def _draw_gull(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> list[Part]:
    plumage = _pick(rng, ((0.95, 0.95, 0.95), (0.12, 0.12, 0.14), (0.55, 0.4, 0.25)), 0.03)
    wing_colour = np.clip(plumage * 0.75, 0, 1)
    wing = _polygon(u, v, [(-0.12, -0.02), (0.1, -0.02), (-0.22, -0.3), (-0.34, -0.28)])
    parts = [
        (_polygon(u, v, [(-0.2, -0.02), (-0.5, -0.08), (-0.5, 0.06)]), wing_colour),
        (_ellipse(u, v, 0.0, 0.0, 0.24, 0.07), plumage),
        (_ellipse(u, v, 0.24, -0.03, 0.07, 0.06), plumage),
        (_polygon(u, v, [(0.3, -0.05), (0.4, -0.02), (0.3, 0.0)]), np.array((0.95, 0.7, 0.1), np.float32)),
        (wing, wing_colour),
        (wing & (np.mod(v, 0.07) < 0.025), _DARK),
        (_ellipse(u, v, 0.26, -0.05, 0.015, 0.015), _DARK),
        (_polygon(u, v, [(0.0, -0.01), (0.22, -0.01), (-0.1, 0.1)]), wing_colour * 0.9),
    ]
    return parts


_DRAW: dict[str, Drawing] = {
    "aeroplane": _draw_biplane,
    "boat": _draw_ship,
    "train": _draw_locomotive,
    "cow": _draw_highland_cow,
    "car": _draw_bubble_car,
    "bird": _draw_gull,
}
# Widths as a fraction of the image side: 16-45 % (the first world's: 30-80 %).
_SCALE: dict[str, tuple[float, float]] = {
    "aeroplane": (0.28, 0.42),
    "boat": (0.26, 0.4),
    "train": (0.32, 0.45),
    "cow": (0.22, 0.32),
    "car": (0.22, 0.32),
    "bird": (0.16, 0.26),
}
_ANCHOR_V: dict[str, float] = {
    "aeroplane": 0.0,
    "boat": 0.1,
    "train": 0.2,
    "cow": 0.28,
    "car": 0.22,
    "bird": 0.0,
}
_EXTENT_V: dict[str, tuple[float, float]] = {
    "aeroplane": (-0.22, 0.25),
    "boat": (-0.42, 0.1),
    "train": (-0.36, 0.2),
    "cow": (-0.23, 0.28),
    "car": (-0.27, 0.22),
    "bird": (-0.3, 0.1),
}
_MAX_TILT_DEG: dict[str, float] = {
    "aeroplane": 10.0,
    "boat": 3.0,
    "train": 0.0,
    "cow": 3.0,
    "car": 0.0,
    "bird": 25.0,
}


def _sample_classes(rng: np.random.Generator, context_rate: float) -> tuple[list[str], list[str]] | None:
    """One to three classes (60 % one), each shown one to three times; a group shares its background."""
    n_classes = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    chosen = [TOY_CLASSES[int(i)] for i in rng.permutation(len(TOY_CLASSES))[:n_classes]]
    classes: list[str] = []
    contexts: list[str] = []
    for name in chosen:
        copies = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
        own = CLASS_BACKGROUND[name]
        if rng.random() < context_rate:
            context = own
        else:
            others = [b for b in TOY_BACKGROUNDS if b != own]
            context = others[int(rng.integers(len(others)))]
        classes += [name] * copies
        contexts += [context] * copies
    if len(classes) > 5 or len({c for c in contexts if c in _GROUND_BACKGROUNDS}) > 2:
        return None
    return classes, contexts


SECOND_WORLD = WorldKind(
    name="second",
    textures=_TEXTURES,
    drawings=_DRAW,
    scale=_SCALE,
    anchor_v=_ANCHOR_V,
    extent_v=_EXTENT_V,
    max_tilt_deg=_MAX_TILT_DEG,
    sample_classes=_sample_classes,
    context_rate=SECOND_CONTEXT_RATE,
)
WORLD_KINDS[SECOND_WORLD.name] = SECOND_WORLD
