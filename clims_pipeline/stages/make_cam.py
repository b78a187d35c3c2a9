"""Stage ``make_cam``: multi-scale + flip CAM inference at full image resolution, sharded over ranks.

For every image it saves ``<workdir>/make_cam/<source>/<id>.npy``, a dict in the IRN/PSA format that later
refinement stages read:

* ``keys``: the image's positive classes (0-based foreground indices, int64 (n,)),
* ``cam``: low-resolution maps (n, ceil(H/4), ceil(W/4)) float32,
* ``high_res``: full-resolution maps (n, H, W) float32,

each map summed over scales (1.0, 0.5, 1.5, 2.0) and flips and divided by its maximum (so 1.0 is the peak).
Images of equal size are inferred as one batch. Finished images are skipped on rerun; the outputs are
recomputed from scratch if the source model changed.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..context import StageContext, register_stage
from ..data import FullImageDataset
from ..distributed import barrier, broadcast_object
from ..files import read_json, save_npy, write_json
from ..networks import CAMNet, build_network
from ..training import autocast_context, final_model_path, load_final_model

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


def cam_directory(ctx: StageContext, source: str) -> Path:
    return ctx.workdir / "make_cam" / source


def cam_image_ids(ctx: StageContext) -> list[str]:
    """The ids to infer: the training split (refinement needs it), the evaluation split, extra splits."""
    splits = [ctx.config.data.train_split, ctx.config.data.eval_split, *ctx.config.make_cam.splits]
    ids: dict[str, None] = {}
    for split in dict.fromkeys(splits):
        ids.update(dict.fromkeys(ctx.validate_split(split, need_labels=True)))
    return list(ids)


def load_cam_network(ctx: StageContext, source: str) -> CAMNet:
    kind = "clims" if source == "train_clims" else "cam"
    # The weights come from the stage's model.pt; skip any backbone download.
    model = build_network(kind, ctx.config.network.backbone, "none", ctx.source.num_classes)
    load_final_model(final_model_path(ctx, source), model)
    return model.to(ctx.device).eval()


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
    height, width = images.shape[-2:]
    stride = model.output_stride
    low_size = (math.ceil(height / low_stride), math.ceil(width / low_stride))
    padded_size = (stride * math.ceil(height / stride), stride * math.ceil(width / stride))
    low_sum: torch.Tensor | None = None
    high_sum: torch.Tensor | None = None
    for scale in scales:
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
        low_sum = low if low_sum is None else low_sum + low
        high_sum = high if high_sum is None else high_sum + high
    assert low_sum is not None and high_sum is not None  # scales is never empty (checked by the caller)
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


def check_cam_inputs(ctx: StageContext) -> None:
    cam_image_ids(ctx)
    source = resolve_cam_source(ctx)
    if not final_model_path(ctx, source).exists() and source not in ctx.requested_stages:
        raise FileNotFoundError(f"make_cam reads {final_model_path(ctx, source)}; run stage {source} first")


@register_stage(
    "make_cam", order=30, help="multi-scale + flip CAM inference (npy per image)", preflight=check_cam_inputs
)
def run(ctx: StageContext) -> None:
    config = ctx.config.make_cam
    if not config.scales:
        raise ValueError("make_cam.scales is empty")
    source = resolve_cam_source(ctx)
    out_dir = cam_directory(ctx, source)
    model_path = final_model_path(ctx, source)
    if not model_path.exists():
        raise FileNotFoundError(f"make_cam reads {model_path}; run stage {source} first")
    image_ids = cam_image_ids(ctx)
    labels: dict[str, list[int]] = {}
    for split in dict.fromkeys([ctx.config.data.train_split, ctx.config.data.eval_split, *config.splits]):
        labels.update(ctx.labels(split))

    # Outputs derived from an older model must not be mixed with new ones.
    stat = model_path.stat()
    fingerprint = {
        "model": str(model_path),
        "model_size": stat.st_size,
        "model_mtime_ns": stat.st_mtime_ns,
        "scales": list(config.scales),
        "flip": config.flip,
        "low_res_stride": config.low_res_stride,
    }
    meta_path = out_dir / "meta.json"
    if ctx.dist.is_main:
        stale = meta_path.exists() and read_json(meta_path).get("fingerprint") != fingerprint
        if (stale or ctx.force) and out_dir.exists():
            shutil.rmtree(out_dir)
        write_json(meta_path, {"fingerprint": fingerprint, "source": source, "complete": False})
    barrier()

    todo = [image_id for image_id in image_ids if not (out_dir / f"{image_id}.npy").exists()]
    ctx.print(
        f"[make_cam] source {source}: {len(image_ids) - len(todo)} of {len(image_ids)} images done already"
    )
    # Sort by size so that equal-size images batch together, then deal them out so every rank gets a similar
    # mix.
    sizes = {image_id: _image_size(ctx, image_id) for image_id in todo}
    todo.sort(key=lambda image_id: (sizes[image_id], image_id))
    shard = todo[ctx.dist.rank :: ctx.dist.world_size]
    model = load_cam_network(ctx, source)
    dataset = FullImageDataset(ctx.source, shard, labels)
    loader = DataLoader(
        dataset,
        batch_sampler=list(same_size_batches([sizes[i] for i in shard], config.batch_size)),
        num_workers=ctx.config.data.num_workers,
    )
    logger = ctx.logger("make_cam")
    progress = tqdm(
        total=len(shard),
        desc=f"make_cam (rank {ctx.dist.rank})" if ctx.dist.is_distributed else "make_cam",
        disable=not ctx.dist.is_main,
        dynamic_ncols=True,
    )
    for batch in loader:
        images = batch["image"].to(ctx.device)
        present = torch.nonzero(batch["label"].sum(dim=0)).flatten()  # classes positive in some image
        low, high = multiscale_cams(
            model,
            images,
            tuple(config.scales),
            config.flip,
            config.low_res_stride,
            ctx.amp,
            classes=present.to(ctx.device),
        )
        for position, image_id in enumerate(batch["id"]):
            keys = torch.nonzero(batch["label"][position]).flatten()
            channels = torch.searchsorted(present, keys).to(ctx.device)  # where each key sits in `present`
            save_npy(
                out_dir / f"{image_id}.npy",
                {
                    "keys": keys.numpy().astype(np.int64),
                    "cam": normalise_by_max(low[position, channels]).cpu().numpy().astype(np.float32),
                    "high_res": normalise_by_max(high[position, channels]).cpu().numpy().astype(np.float32),
                },
            )
        progress.update(len(batch["id"]))
    progress.close()
    barrier()
    missing = broadcast_object(
        [i for i in image_ids if not (out_dir / f"{i}.npy").exists()] if ctx.dist.is_main else None
    )
    if missing:
        raise RuntimeError(
            f"make_cam: {len(missing)} CAM files missing after inference, e.g. {out_dir / missing[0]}.npy"
        )
    if ctx.dist.is_main:
        write_json(
            meta_path,
            {"fingerprint": fingerprint, "source": source, "complete": True, "images": len(image_ids)},
        )
    logger.log("done", images=len(image_ids), inferred=len(todo), source=source)
    ctx.print(f"[make_cam] wrote {len(image_ids)} CAM files to {out_dir}")


def _image_size(ctx: StageContext, image_id: str) -> tuple[int, int]:
    with Image.open(ctx.source.image_path(image_id)) as image:
        return image.size
