"""Stage ``train_seg``: DeepLabV2-ResNet-101 (ASPP 6/12/18/24, MSC) trained on the pseudo masks of the
refiner that ``refine.method`` chooses (``make_rw``: PSA; ``make_sem_seg``: IRNet).

deeplab-pytorch's VOC configuration as CLIMS used it: batch 10, 30k iterations, lr 2.5e-4 with poly 0.9
(10x on ASPP), momentum 0.9, weight decay 5e-4, random rescaling by 0.5-1.5, flip, crop 321 (image padded with
the mean, masks with 255), initialised from ImageNet or COCO weights in a local file (``train_seg.weights``:
torchvision, deeplab-pytorch or this pipeline's layout; see ``segmentation_init``). The shared trainer gives
DDP, AMP, checkpoints and resuming; the loss is normalised over the global batch's labelled pixels, so a DDP
step equals a single-process step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..config import TrainConfig, TrainSegConfig
from ..context import StageContext, register_stage
from ..data import SegmentationSource
from ..deeplab import build_deeplab, msc_loss
from ..label_maps import (
    crop_image_and_labels,
    pseudo_mask_directory,
    read_label_png,
    sem_seg_mask_directory,
    training_mask_stage,
)
from ..runstate import output_digest
from ..training import LossFunction, TrainerStage

FLIP = Image.Transpose.FLIP_LEFT_RIGHT
BILINEAR, NEAREST = Image.Resampling.BILINEAR, Image.Resampling.NEAREST


class SegmentationCropDataset(Dataset[dict[str, Any]]):
    """Random-scale, flip and crop of (image, mask) pairs, indexed by ``(epoch, index)``."""

    def __init__(
        self,
        source: SegmentationSource,
        image_ids: list[str],
        mask_dir: Path | None,
        config: TrainSegConfig,
        seed: int,
    ):
        self.source = source
        self.image_ids = list(image_ids)
        self.mask_dir = mask_dir  # None: the dataset's ground-truth masks
        self.config = config
        self.seed = seed

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_mask(self, image_id: str) -> np.ndarray:
        if self.mask_dir is None:
            return self.source.load_mask(image_id)
        return read_label_png(self.mask_dir / f"{image_id}.png")

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        image_id = self.image_ids[index]
        image = self.source.load_image(image_id)
        mask = Image.fromarray(self.load_mask(image_id))
        scale = float(rng.choice(self.config.scales))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image, mask = (
            image.resize(size, Image.Resampling.BILINEAR),
            mask.resize(size, Image.Resampling.NEAREST),
        )
        if rng.random() < 0.5:
            image, mask = (
                image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            )
        crop, labels = crop_image_and_labels(image, np.asarray(mask), self.config.crop_size, rng)
        return {"image": torch.from_numpy(crop), "label": torch.from_numpy(labels), "index": index}


def training_masks(ctx: StageContext) -> Path | None:
    stage = training_mask_stage(ctx)
    if stage is None:
        return None
    return pseudo_mask_directory(ctx) if stage == "make_rw" else sem_seg_mask_directory(ctx)


@register_stage
class TrainSeg(TrainerStage):
    name, order = "train_seg", 70
    help = "DeepLabV2-ResNet-101 (ASPP, MSC) on the pseudo masks, deeplab-pytorch's VOC settings"

    def inputs(self, ctx: StageContext) -> tuple[str, ...]:
        stage = training_mask_stage(ctx)
        return () if stage is None else (stage,)

    def check(self, ctx: StageContext) -> None:
        ctx.validate_split(ctx.config.data.train_split)

    def train_config(self, ctx: StageContext) -> TrainConfig:
        return ctx.config.train_seg.train

    def fingerprint(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config.train_seg
        mask_dir = training_masks(ctx)
        return {
            "backbone": config.backbone,
            "weights": config.weights,
            "crop_size": config.crop_size,
            "scales": list(config.scales),
            "msc_scales": list(config.msc_scales),
            "train_split": ctx.config.data.train_split,
            "masks": "ground_truth"
            if mask_dir is None
            else output_digest(mask_dir, str(training_mask_stage(ctx))),
        }

    def build_dataset(self, ctx: StageContext) -> Dataset[dict[str, Any]]:
        image_ids = ctx.validate_split(ctx.config.data.train_split)
        mask_dir = training_masks(ctx)
        if mask_dir is not None:
            missing = [i for i in image_ids if not (mask_dir / f"{i}.png").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"train_seg: {len(missing)} pseudo masks missing, e.g. {mask_dir / missing[0]}.png"
                )
        return SegmentationCropDataset(ctx.source, image_ids, mask_dir, ctx.config.train_seg, ctx.seed)

    def build_model(self, ctx: StageContext) -> nn.Module:
        config = ctx.config.train_seg
        torch.manual_seed(ctx.seed)
        model = build_deeplab(ctx.source.num_classes + 1, config.backbone, config.weights, config.msc_scales)
        report = model.base.init_report
        if report is not None:
            ctx.print(f"[train_seg] {report.summary()}")
            ctx.logger("train_seg").log("init", **report.as_dict())
        return model

    def loss_function(self, ctx: StageContext, model: nn.Module) -> LossFunction:
        world_size = ctx.dist.world_size

        def loss_fn(
            network: nn.Module, batch: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # Normalised by the labelled pixels of the global batch: a DDP step equals a 1-process step.
            return msc_loss(network(batch["image"]), batch["label"], world_size=world_size), {}

        return loss_fn
