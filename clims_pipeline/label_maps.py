"""Label maps as palette PNGs (affinity labels, pseudo masks, predictions) and their mIoU.

The PNGs hold class indices (0 background, 1..K, 255 ignore) with the VOC colours as palette, so they open as
pictures and read back as the indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .context import StageContext
from .data import VOID_LABEL, DatasetError, normalize_image, random_crop_with_padding
from .distributed import all_reduce_sum
from .metrics import confusion_matrix
from .runstate import verify_file
from .visualize import label_palette


def palette_image(labels: np.ndarray) -> Image.Image:
    """(H, W) uint8 labels -> a palette PNG image with the VOC colours (values stay the class indices)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(label_palette().flatten().tolist())
    return image


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG, after checking its size and sha256 against those its stage's manifest recorded (a
    mismatch raises :class:`~clims_pipeline.files.DamagedFileError` naming the file and the stage)."""
    verify_file(path)
    with Image.open(path) as image:
        return np.array(image, dtype=np.uint8)


def pseudo_mask_directory(ctx: StageContext) -> Path:
    """Where ``make_rw`` writes the pseudo masks that ``train_seg`` trains on."""
    return ctx.workdir / "make_rw" / "masks"


def crop_image_and_labels(
    image: Image.Image, labels: np.ndarray, crop_size: int, rng: np.random.Generator, ignore: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """One random crop of the normalised image (pad 0) and its labels (pad ``ignore``)."""
    stacked = np.concatenate([normalize_image(image), labels[None].astype(np.float32) + 1.0])
    crop = random_crop_with_padding(stacked, crop_size, rng)
    cropped_labels = crop[3]  # 0 only where the crop was padded
    out_labels = np.where(cropped_labels == 0, ignore, cropped_labels - 1).astype(np.int64)
    return np.ascontiguousarray(crop[:3]), out_labels


def segmentation_confusion(
    ctx: StageContext, image_ids: list[str], prediction_dir: Path, num_labels: int
) -> np.ndarray:
    """Confusion matrix of saved label PNGs against the ground truth, summed over ranks."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for image_id in image_ids[ctx.dist.rank :: ctx.dist.world_size]:
        ground_truth = ctx.source.load_mask(image_id)
        prediction = read_label_png(prediction_dir / f"{image_id}.png")
        if prediction.shape != ground_truth.shape:
            raise DatasetError(
                f"prediction {prediction_dir / image_id}.png is {prediction.shape} but mask "
                f"{ctx.source.mask_path(image_id)} is {ground_truth.shape}"
            )
        confusion += confusion_matrix(ground_truth, prediction, num_labels, VOID_LABEL)
    summed: np.ndarray = all_reduce_sum(torch.from_numpy(confusion)).numpy()
    return summed


def per_class(class_names: tuple[str, ...], iou: np.ndarray) -> dict[str, float | None]:
    """IoU per class in percent (None for a class absent from both ground truth and prediction)."""
    return {
        name: (None if np.isnan(value) else round(100 * float(value), 2))
        for name, value in zip(class_names, iou, strict=True)
    }
