"""Stage ``train_aff``: PSA's AffinityNet, trained on affinity labels derived from the CAMs.

1. Affinity labels: for every training image, the CAMs of ``make_cam`` with a background score
   ``(1 - max CAM)^alpha`` are refined by the dense CRF at a low (4) and a high (32) ``alpha``; the confident
   foreground of the first and the confident background of the second are kept, the rest ignored (255). They
   are saved as palette PNGs in ``<workdir>/train_aff/labels/`` (skipped on rerun; redone if the CAMs or the
   settings changed).
2. Training: random rescale (long side 448-768), colour jitter, flip, crop 448; labels reduced to the stride-8
   grid; pairs within radius 5; loss ``L_bg/4 + L_fg/4 + L_neg/2``; 8 epochs of batch 8, lr 0.1 poly (10x
   head), weight decay 5e-4 (PSA's settings, ``train_aff.*`` in the config). The shared trainer gives DDP,
   AMP, checkpoints per epoch and resuming; the pair means are taken over the global batch, so a DDP step
   equals a single-process step.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..config import TrainAffConfig
from ..context import StageContext, register_stage
from ..crf import PSA_CRF, require_densecrf
from ..data import SegmentationSource, normalize_image, random_crop_with_padding, random_rescale_long_side
from ..distributed import barrier, broadcast_object
from ..files import read_json, save_png, write_json
from ..random_walk import (
    FEATURE_STRIDE,
    AffinityNet,
    affinity_loss,
    confident_label_map,
    downsample_labels,
    pair_affinities,
    pair_offsets,
)
from ..training import final_model_path, train_network
from ..visualize import label_palette
from .eval_cam import load_cam_file
from .make_cam import cam_directory, resolve_cam_source


def build_affinity_net(config: TrainAffConfig, weights: str) -> AffinityNet:
    widths = (64, 128, 256) if config.backbone == "resnet50" else (8, 8, 16)
    return AffinityNet(config.backbone, weights, widths=widths)


def palette_image(labels: np.ndarray) -> Image.Image:
    """(H, W) uint8 labels -> a palette PNG image with the VOC colours (values stay the class indices)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(label_palette().flatten().tolist())
    return image


def read_label_png(path: Any) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image, dtype=np.uint8)


def label_directory(ctx: StageContext) -> Any:
    return ctx.workdir / "train_aff" / "labels"


def cam_fingerprint(ctx: StageContext) -> dict[str, Any]:
    """What the CAM files were made from (make_cam's own fingerprint): a change makes derived files stale."""
    meta_path = cam_directory(ctx, resolve_cam_source(ctx)) / "meta.json"
    meta = read_json(meta_path) if meta_path.exists() else {}
    if not meta.get("complete"):
        raise FileNotFoundError(f"incomplete CAMs in {meta_path.parent}: run make_cam first")
    return meta["fingerprint"]


def check_crf(enabled: bool) -> None:
    if enabled:
        require_densecrf()


def make_affinity_labels(ctx: StageContext, image_ids: list[str]) -> None:
    config = ctx.config.train_aff
    out_dir = label_directory(ctx)
    cam_dir = cam_directory(ctx, resolve_cam_source(ctx))
    fingerprint = {
        "cams": cam_fingerprint(ctx),
        "low_power": config.low_power,
        "high_power": config.high_power,
        "crf": PSA_CRF.as_dict() if config.crf else None,
    }
    meta_path = out_dir / "meta.json"
    if ctx.dist.is_main:
        stale = meta_path.exists() and read_json(meta_path).get("fingerprint") != fingerprint
        if (stale or ctx.force) and out_dir.exists():
            shutil.rmtree(out_dir)
        write_json(meta_path, {"fingerprint": fingerprint, "complete": False})
    barrier()
    todo = [image_id for image_id in image_ids if not (out_dir / f"{image_id}.png").exists()]
    shard = todo[ctx.dist.rank :: ctx.dist.world_size]
    ctx.print(f"[train_aff] affinity labels: {len(image_ids) - len(todo)} of {len(image_ids)} done already")
    for image_id in tqdm(shard, desc="affinity labels", disable=not ctx.dist.is_main, dynamic_ncols=True):
        image = np.asarray(ctx.source.load_image(image_id))
        cam = load_cam_file(cam_dir / f"{image_id}.npy")
        labels = confident_label_map(
            image,
            cam["high_res"],
            cam["keys"],
            low_power=config.low_power,
            high_power=config.high_power,
            crf=PSA_CRF if config.crf else None,
        )
        save_png(out_dir / f"{image_id}.png", palette_image(labels))
    barrier()
    missing = broadcast_object(
        [i for i in image_ids if not (out_dir / f"{i}.png").exists()] if ctx.dist.is_main else None
    )
    if missing:
        raise RuntimeError(
            f"train_aff: {len(missing)} affinity labels missing, e.g. {out_dir / missing[0]}.png"
        )
    if ctx.dist.is_main:
        write_json(meta_path, {"fingerprint": fingerprint, "complete": True, "images": len(image_ids)})


def color_jitter(image: Image.Image, strengths: tuple[float, ...], rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation (factors in 1 +- s) and hue (shift in +-s), drawn from ``rng`` so that
    a resumed run sees the same augmentation."""
    brightness, contrast, saturation, hue = strengths
    for enhancer, strength in (
        (ImageEnhance.Brightness, brightness),
        (ImageEnhance.Contrast, contrast),
        (ImageEnhance.Color, saturation),
    ):
        if strength > 0:
            image = enhancer(image).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    if hue > 0:
        image = TF.adjust_hue(image, float(rng.uniform(-hue, hue)))
    return image


def crop_image_and_labels(
    image: Image.Image, labels: np.ndarray, crop_size: int, rng: np.random.Generator, ignore: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """One random crop of the normalised image (pad 0) and its labels (pad ``ignore``)."""
    stacked = np.concatenate([normalize_image(image), labels[None].astype(np.float32) + 1.0])
    crop = random_crop_with_padding(stacked, crop_size, rng)
    cropped_labels = crop[3]  # 0 only where the crop was padded
    out_labels = np.where(cropped_labels == 0, ignore, cropped_labels - 1).astype(np.int64)
    return np.ascontiguousarray(crop[:3]), out_labels


class AffinityCropDataset(Dataset):
    """Training crops with stride-8 affinity labels, indexed by ``(epoch, index)`` (see TrainCropDataset)."""

    def __init__(
        self,
        source: SegmentationSource,
        image_ids: list[str],
        label_dir: Any,
        config: TrainAffConfig,
        seed: int,
    ):
        if config.crop_size % FEATURE_STRIDE:
            raise ValueError(
                f"train_aff.crop_size must be a multiple of {FEATURE_STRIDE}, got {config.crop_size}"
            )
        self.source = source
        self.image_ids = list(image_ids)
        self.label_dir = label_dir
        self.config = config
        self.seed = seed
        self.num_labels = source.num_classes + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        image_id = self.image_ids[index]
        image = self.source.load_image(image_id)
        labels = Image.fromarray(read_label_png(self.label_dir / f"{image_id}.png"))
        image = random_rescale_long_side(image, rng, tuple(self.config.resize_long))
        labels = labels.resize(image.size, Image.NEAREST)
        if rng.random() < 0.5:
            image, labels = image.transpose(Image.FLIP_LEFT_RIGHT), labels.transpose(Image.FLIP_LEFT_RIGHT)
        image = color_jitter(image, tuple(self.config.color_jitter), rng)
        crop, crop_labels = crop_image_and_labels(image, np.asarray(labels), self.config.crop_size, rng)
        grid_labels = downsample_labels(torch.from_numpy(crop_labels)[None], FEATURE_STRIDE, self.num_labels)[
            0
        ]
        return {"image": torch.from_numpy(crop), "label": grid_labels, "index": index}


def check_inputs(ctx: StageContext) -> None:
    ctx.validate_split(ctx.config.data.train_split, need_labels=True)
    if final_model_path(ctx, "train_aff").exists() and not ctx.force:
        return
    check_crf(ctx.config.train_aff.crf)
    if (
        "make_cam" not in ctx.requested_stages
        and not (cam_directory(ctx, resolve_cam_source(ctx)) / "meta.json").exists()
    ):
        raise FileNotFoundError("train_aff reads the CAMs of make_cam: run make_cam first")


@register_stage(
    "train_aff",
    order=50,
    help="PSA AffinityNet: affinity labels from the CAMs (two background powers + CRF), then training",
    preflight=check_inputs,
)
def run(ctx: StageContext) -> None:
    config = ctx.config.train_aff
    if final_model_path(ctx, "train_aff").exists() and not ctx.force:
        ctx.print(f"[train_aff] done already: {final_model_path(ctx, 'train_aff')} (use --force to retrain)")
        return
    split = ctx.config.data.train_split
    image_ids = ctx.validate_split(split, need_labels=True)
    make_affinity_labels(ctx, image_ids)
    dataset = AffinityCropDataset(ctx.source, image_ids, label_directory(ctx), config, ctx.seed)
    torch.manual_seed(ctx.seed)  # the same head init on every rank and every rerun
    model = build_affinity_net(config, config.weights)
    offsets = pair_offsets(config.radius)
    world_size = ctx.dist.world_size

    def loss_fn(
        network: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = network(batch["image"]).float()
        # Pair means over the global batch (ranks hold different pair counts): DDP step == 1-process step.
        return affinity_loss(pair_affinities(features, offsets), batch["label"], offsets, world_size)

    meta = {
        "backbone": config.backbone,
        "weights": config.weights,
        "crop_size": config.crop_size,
        "radius": config.radius,
        "powers": [config.low_power, config.high_power],
        "crf": config.crf,
        "train_split": split,
        "cams": resolve_cam_source(ctx),
    }
    train_network(ctx, "train_aff", model, dataset, config.train, loss_fn, meta)  # type: ignore[arg-type]
