"""CAM files: how ``make_cam`` computes them and how every later stage finds and reads them.

A CAM file is ``<workdir>/make_cam/<source>/<id>.npy``, a dict in the IRN/PSA format:

* ``keys``: the image's positive classes (0-based foreground indices, int64 (n,)),
* ``cam``: low-resolution maps (n, ceil(H/4), ceil(W/4)) float32,
* ``high_res``: full-resolution maps (n, H, W) float32,

each map summed over scales and flips and divided by its maximum (so 1.0 is the peak).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .context import StageContext
from .networks import CAMNet
from .runstate import output_digest, verify_file
from .training import autocast_context, final_model_path

#: The networks whose CAMs ``make_cam`` can infer.
CAM_SOURCES = ("train_cam", "train_clims")


def resolve_cam_source(ctx: StageContext) -> str:
    """``auto``: the CLIMS network when it is (or is about to be) trained, else the baseline CAM network."""
    source = ctx.config.make_cam.source
    if source == "auto":
        clims_ready = final_model_path(ctx, "train_clims").exists() or "train_clims" in ctx.requested_stages
        return "train_clims" if clims_ready else "train_cam"
    if source not in CAM_SOURCES:
        raise ValueError(f"expected make_cam.source 'auto' or one of {CAM_SOURCES}, got {source!r}")
    return source


def limited(ctx: StageContext, image_ids: list[str]) -> list[str]:
    """The first ``make_cam.limit`` ids of a split (all of them when it is None): the images make_cam infers
    and eval_cam evaluates."""
    limit = ctx.config.make_cam.limit
    return image_ids if limit is None else image_ids[:limit]


def cam_directory(ctx: StageContext, source: str | None = None) -> Path:
    return ctx.workdir / "make_cam" / (source or resolve_cam_source(ctx))


def cam_digest(ctx: StageContext) -> str:
    """The fingerprint digest of the complete CAMs a later stage reads (raises when they are unfinished)."""
    return output_digest(cam_directory(ctx), "make_cam")


def load_cam_file(path: Path) -> dict[str, np.ndarray]:
    """A CAM file, after checking its size and sha256 against those make_cam's manifest recorded (a
    mismatch raises :class:`~clims_pipeline.files.DamagedFileError` naming the file and the stage)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing CAM file {path}: run make_cam (with the same --eval-split) first")
    verify_file(path)
    loaded: dict[str, np.ndarray] = np.load(path, allow_pickle=True).item()
    return loaded


def foreground_prediction(cam: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(arg-max class in 1..K, its score) per pixel of the full-resolution maps; class 0 / score 0 when the
    image has no positive class."""
    maps = cam["high_res"]
    if len(cam["keys"]) == 0:
        return np.zeros(maps.shape[1:], dtype=np.int64), np.zeros(maps.shape[1:], dtype=np.float32)
    winner = maps.argmax(axis=0)
    return np.asarray(cam["keys"], dtype=np.int64)[winner] + 1, maps.max(axis=0)


@torch.no_grad()
def multiscale_cams(
    model: CAMNet,
    images: torch.Tensor,
    scales: tuple[float, ...],
    flip: bool,
    low_stride: int,
    amp: bool,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed maps of same-size images: low-res (B, C, ceil(H/s), ceil(W/s)) and full-res (B, C, H, W), for
    the class indices ``classes`` (C of them; all K classes when ``None``).

    Only the requested classes are upsampled: an image has 1-2 of VOC's 20 classes, and the full-resolution
    upsampling of every class at every scale would dominate the inference time. A map at output stride 16
    covers ``16 * ceil(H / 16)`` pixels, so it is upsampled to that padded size and cropped, which keeps it
    aligned with the image; the low-resolution maps are resized directly.
    """
    if not scales:
        raise ValueError("expected at least one scale in make_cam.scales, got ()")
    height, width = images.shape[-2:]
    stride = model.output_stride
    low_size = (math.ceil(height / low_stride), math.ceil(width / low_stride))
    padded_size = (stride * math.ceil(height / stride), stride * math.ceil(width / stride))
    low_sum = torch.zeros(())
    high_sum = torch.zeros(())
    for position, scale in enumerate(scales):
        scaled = (
            images
            if scale == 1.0
            else F.interpolate(
                images,
                size=(max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))),
                mode="bilinear",
                align_corners=False,
            )
        )
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        with autocast_context(images.device, amp):
            maps = model.activation_maps(batch).float()
        if flip:
            maps = maps[: len(images)] + maps[len(images) :].flip(-1)
        if classes is not None:
            maps = maps[:, classes]
        low = F.interpolate(maps, size=low_size, mode="bilinear", align_corners=False)
        high = F.interpolate(maps, size=padded_size, mode="bilinear", align_corners=False)[
            ..., :height, :width
        ]
        # The first scale starts the sums (adding it to zeros would change nothing but the bits of -0.0).
        low_sum = low if position == 0 else low_sum + low
        high_sum = high if position == 0 else high_sum + high
    return low_sum, high_sum


def normalise_by_max(maps: torch.Tensor) -> torch.Tensor:
    """Each (n, h, w) map divided by its maximum (+1e-5 so empty maps stay 0)."""
    return maps / (maps.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5)


def same_size_batches(sizes: list[tuple[int, int]], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of equal (width, height); ``sizes`` should be sorted for full batches."""
    batch: list[int] = []
    for index, size in enumerate(sizes):
        if batch and (size != sizes[batch[0]] or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch
