"""``python -m clims_pipeline.demo_data OUT``: a small demo data set in the simple layout and a tiny randomly
initialised open_clip checkpoint, to walk through docs/own-data.md without data of your own.

It writes::

    OUT/data/images/<id>.png      64-pixel images: balls, boxes and kites on smooth backgrounds
    OUT/data/labels.csv           image,labels,split
    OUT/data/classes.txt          the three classes, one with its own prompt words
    OUT/data/masks/<id>.png       0 background, k + 1 class k (for evaluation only)
    OUT/clip/demo-clip.json       an open_clip model config (a one-layer ViT with 32-pixel input)
    OUT/clip/demo-clip.pt         its random weights, as an open_clip checkpoint file

The CLIP is random: CAMs trained with it show the pipeline working, not CLIMS helping.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from .clip_training import save_checkpoint
from .config import SMOKE_CLIP_NAME

#: (name the labels use, the words the prompts use).
DEMO_CLASSES = (("ball", "ball"), ("box", "box"), ("kite", "paper kite"))
DEMO_CLIP = "demo-clip"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] / size
    top, bottom = rng.uniform(0.2, 0.9, 3), rng.uniform(0.1, 0.8, 3)
    mix = (ys * np.cos(rng.uniform(0, 1)) + xs * np.sin(rng.uniform(0, 1)))[..., None].clip(0, 1)
    image = top * (1 - mix) + bottom * mix + rng.normal(0, 0.03, (size, size, 3))
    return np.asarray(image.clip(0, 1), dtype=np.float64)


def _shape(kind: str, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size]
    dy, dx = ys - cy, xs - cx
    if kind == "ball":
        return np.asarray(dy**2 + dx**2 <= radius**2)
    if kind == "box":
        return np.asarray((np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85))
    return np.asarray(np.abs(dy) / 1.3 + np.abs(dx) <= radius)  # kite: a diamond


def render(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One image (H, W, 3) uint8, its mask (values 0..3) and its class names (1 or 2 classes)."""
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    count = int(rng.integers(1, 3))
    chosen = sorted(rng.choice(len(DEMO_CLASSES), size=count, replace=False).tolist())
    for index in chosen:
        radius = float(rng.uniform(0.12, 0.2) * size)
        cy, cx = rng.uniform(radius, size - radius, 2)
        region = _shape(DEMO_CLASSES[index][0], size, cy, cx, radius)
        image[region] = rng.uniform(0.0, 1.0, 3) * 0.5 + np.eye(3)[index] * 0.5
        mask[region] = index + 1
    labels = [DEMO_CLASSES[i][0] for i in sorted(set(int(v) - 1 for v in np.unique(mask) if v))]
    return (image * 255).round().astype(np.uint8), mask, labels


def write_demo_data(root: Path, images: int = 48, val_share: float = 0.25, seed: int = 0) -> None:
    """The simple layout under ``root`` (see the module)."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    n_val = max(1, round(images * val_share))
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "labels", "split"])
        for index in range(images):
            image, mask, labels = render(rng)
            image_id = f"demo_{index:03d}"
            Image.fromarray(image).save(root / "images" / f"{image_id}.png")
            Image.fromarray(mask, mode="L").save(root / "masks" / f"{image_id}.png")
            writer.writerow([f"{image_id}.png", ";".join(labels), "val" if index < n_val else "train"])
    lines = ["# one class a line: the name the labels use, then (optionally) the words the prompts use"]
    lines += [name if words == name else f"{name}: {words}" for name, words in DEMO_CLASSES]
    (root / "classes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_demo_clip(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip model config and its random weights; returns (config, checkpoint)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{DEMO_CLIP}.json"
    shutil.copyfile(CONFIG_DIR / f"{SMOKE_CLIP_NAME}.json", config)
    if DEMO_CLIP not in open_clip.list_models():
        open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(DEMO_CLIP)
    checkpoint = directory / f"{DEMO_CLIP}.pt"
    save_checkpoint(model, checkpoint, {"model": DEMO_CLIP, "note": "random weights (demo)"})
    return config, checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write data/ and clip/ into")
    parser.add_argument("--images", type=int, default=48, help="number of images (a quarter go to val)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 4:
        parser.error(f"--images: expected at least 4, got {args.images}")
    write_demo_data(args.out / "data", args.images, seed=args.seed)
    config, checkpoint = write_demo_clip(args.out / "clip", seed=args.seed)
    print(f"demo data set (simple layout, {args.images} images): {args.out / 'data'}")
    print(f"tiny random CLIP: model config {config}, checkpoint {checkpoint}")


if __name__ == "__main__":
    main()
