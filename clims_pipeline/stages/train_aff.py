"""Stage ``train_aff``: PSA's AffinityNet, trained on affinity labels derived from the CAMs.

1. Affinity labels: for every training image, the CAMs of ``make_cam`` with a background score
   ``(1 - max CAM)^alpha`` are refined by the dense CRF at a low (4) and a high (32) ``alpha``; the confident
   foreground of the first and the confident background of the second are kept, the rest ignored (255). They
   are saved as palette PNGs in ``<workdir>/train_aff/labels/`` (kept on rerun; redone if the CAMs or the
   settings changed).
2. Training: random rescale (long side 448-768), colour jitter, flip, crop 448; labels reduced to the stride-8
   grid; pairs within radius 5; loss ``L_bg/4 + L_fg/4 + L_neg/2``; 8 epochs of batch 8, lr 0.1 poly (10x
   head), weight decay 5e-4 (PSA's settings, ``train_aff.*`` in the config). The shared trainer gives DDP,
   AMP, checkpoints per epoch and resuming; the pair means are taken over the global batch, so a DDP step
   equals a single-process step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance
from torch import nn
from torch.utils.data import Dataset

from ..config import TrainAffConfig
from ..context import StageContext, register_stage
from ..crf import PSA_CRF
from ..data import SegmentationSource, random_rescale_long_side
from ..label_maps import CamLabeller, RefinerTrainerStage, crop_image_and_labels, read_label_png
from ..random_walk import (
    affinity_loss,
    build_affinity_net,
    confident_label_map,
    downsample_labels,
    pair_affinities,
    pair_offsets,
)
from ..training import LossFunction

FLIP = Image.Transpose.FLIP_LEFT_RIGHT
BILINEAR, NEAREST = Image.Resampling.BILINEAR, Image.Resampling.NEAREST


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


class AffinityCropDataset(Dataset[dict[str, Any]]):
    """Training crops with stride-8 affinity labels, indexed by ``(epoch, index)`` (see TrainCropDataset)."""

    def __init__(
        self,
        source: SegmentationSource,
        image_ids: list[str],
        label_dir: Path,
        config: TrainAffConfig,
        seed: int,
    ):
        if config.crop_size % config.feature_stride:
            raise ValueError(
                f"train_aff.crop_size must be a multiple of train_aff.feature_stride "
                f"({config.feature_stride}), got {config.crop_size}"
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
        image = random_rescale_long_side(
            image, rng, (int(self.config.resize_long[0]), int(self.config.resize_long[1]))
        )
        labels = labels.resize(image.size, NEAREST)
        if rng.random() < 0.5:
            image, labels = (
                image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                labels.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            )
        image = color_jitter(image, tuple(self.config.color_jitter), rng)
        crop, crop_labels = crop_image_and_labels(image, np.asarray(labels), self.config.crop_size, rng)
        stride = self.config.feature_stride
        grid_labels = downsample_labels(torch.from_numpy(crop_labels)[None], stride, self.num_labels)[0]
        return {"image": torch.from_numpy(crop), "label": grid_labels, "index": index}


@register_stage
class TrainAff(RefinerTrainerStage):
    name, order = "train_aff", 50
    help = "PSA AffinityNet: affinity labels from the CAMs (two background powers + CRF), then training"

    crop_dataset = AffinityCropDataset
    method, labels_what = "psa", "affinity labels"

    def fingerprint(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config.train_aff
        return {
            "backbone": config.backbone,
            "weights": config.weights,
            "crop_size": config.crop_size,
            "resize_long": list(config.resize_long),
            "color_jitter": list(config.color_jitter),
            "radius": config.radius,
            "feature_stride": config.feature_stride,
            "train_split": ctx.config.data.train_split,
            # The labels' digest covers the CAMs, the powers and the CRF.
            "labels": self.labels_digest(ctx),
        }

    def check(self, ctx: StageContext) -> None:
        super().check(ctx)
        source = ctx.config.train_aff.label_source
        if source not in ("cams", "ground_truth"):
            raise ValueError(f"train_aff.label_source: expected 'cams' or 'ground_truth', got {source!r}")

    def label_settings(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config.train_aff
        if config.label_source == "ground_truth":
            return {"ground_truth": ctx.config.data.train_split}
        crf = PSA_CRF.as_dict() if config.crf else None
        return {"low_power": config.low_power, "high_power": config.high_power, "crf": crf}

    def labeller(self, ctx: StageContext) -> CamLabeller:
        """Confident labels from the CAMs; with ``train_aff.label_source = "ground_truth"`` the data set's
        masks instead (void stays ignored): the oracle of how AffinityNet learns from noise-free labels."""
        config = ctx.config.train_aff
        crf = PSA_CRF if config.crf else None

        def make_labels(image_id: str, image: np.ndarray, cam: dict[str, np.ndarray]) -> np.ndarray:
            if config.label_source == "ground_truth":
                return ctx.source.load_mask(image_id)
            return confident_label_map(
                image, cam["high_res"], cam["keys"], config.low_power, config.high_power, crf=crf
            )

        return make_labels

    def build_model(self, ctx: StageContext) -> nn.Module:
        torch.manual_seed(ctx.seed)  # the same head init on every rank and every rerun
        config = ctx.config.train_aff
        return build_affinity_net(config.backbone, config.weights, config.feature_stride)

    def loss_function(self, ctx: StageContext, model: nn.Module) -> LossFunction:
        offsets = pair_offsets(ctx.config.train_aff.radius)
        world_size = ctx.dist.world_size

        def loss_fn(
            network: nn.Module, batch: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            features = network(batch["image"]).float()
            # Pair means over the global batch (ranks hold different pair counts): DDP step == 1-process step.
            return affinity_loss(pair_affinities(features, offsets), batch["label"], offsets, world_size)

        return loss_fn
