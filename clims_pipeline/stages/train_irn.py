"""Stage ``train_irn``: IRNet's inter-pixel relation labels from the CAMs, then its boundary and displacement
branches trained on them (the refiner of the official improved CLIMS run; ``clims_pipeline.irnet``).

1. Relation labels (``<workdir>/train_irn/labels/<id>.png``, palette PNGs, an output of their own): the CAMs
   of every training image with a constant background score of ``train_irn.fg_threshold`` (0.30: the
   confident foreground) and of ``train_irn.bg_threshold`` (0.10: the confident background), each arg-max
   smoothed by IRN's label CRF (``train_irn.crf``); the rest ignored (255).
2. Training: random rescale by 0.5-1.5, flip, crop 512; labels reduced to the stride-4 grid; pairs within
   radius 10; loss ``(L_bg/2 + L_fg/2 + L_neg)/2 + (L_dfg + L_dbg)/2``; 3 epochs of batch 32, lr 0.1 poly
   (displacement branch 10x), weight decay 1e-4, the ResNet-50 backbone frozen (IRN's settings,
   ``train_irn.*``). The shared trainer gives DDP, AMP, checkpoints and resuming; every term is a mean over
   the pairs of the global batch, so a DDP step equals a single-process step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..config import TrainIRNConfig
from ..context import StageContext, register_stage
from ..crf import IRN_LABEL_CRF
from ..data import SegmentationSource
from ..irnet import INPUT_MULTIPLE, IRN_STRIDE, build_irnet, irn_loss, relation_label_map
from ..label_maps import CamLabeller, RefinerTrainerStage, crop_image_and_labels, read_label_png
from ..random_walk import downsample_labels, pair_offsets
from ..training import LossFunction

STAGE = "train_irn"


class RelationCropDataset(Dataset[dict[str, Any]]):
    """IRN's training crops (rescale, flip, crop) with stride-4 relation labels, indexed by
    ``(epoch, index)`` so that a resumed run sees the same crops."""

    def __init__(
        self,
        source: SegmentationSource,
        image_ids: list[str],
        label_dir: Path,
        config: TrainIRNConfig,
        seed: int,
    ):
        if config.crop_size % INPUT_MULTIPLE:
            raise ValueError(
                f"train_irn.crop_size must be a multiple of {INPUT_MULTIPLE}, got {config.crop_size}"
            )
        low, high = config.scales
        if not 0 < low <= high:
            raise ValueError(
                f"train_irn.scales must be (low, high) with 0 < low <= high, got {config.scales}"
            )
        self.source, self.image_ids, self.label_dir = source, list(image_ids), label_dir
        self.config, self.seed = config, seed
        self.num_labels = source.num_classes + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        image_id = self.image_ids[index]
        image = self.source.load_image(image_id)
        labels = Image.fromarray(read_label_png(self.label_dir / f"{image_id}.png"))
        scale = float(rng.uniform(*self.config.scales))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image, labels = (
            image.resize(size, Image.Resampling.BILINEAR),
            labels.resize(size, Image.Resampling.NEAREST),
        )
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            labels = labels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop, crop_labels = crop_image_and_labels(image, np.asarray(labels), self.config.crop_size, rng)
        grid = downsample_labels(torch.from_numpy(crop_labels)[None], IRN_STRIDE, self.num_labels)[0]
        return {"image": torch.from_numpy(crop), "label": grid, "index": index}


@register_stage
class TrainIRN(RefinerTrainerStage):
    name, order = STAGE, 62
    help = (
        "IRNet: relation labels from the CAMs (two thresholds + CRF), then its boundary/displacement branches"
    )

    crop_dataset = RelationCropDataset
    method, labels_what = "irn", "relation labels"

    def fingerprint(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config.train_irn
        return {
            "backbone": config.backbone,
            "weights": config.weights,
            "freeze_backbone": config.freeze_backbone,
            "crop_size": config.crop_size,
            "scales": list(config.scales),
            "radius": config.radius,
            "train_split": ctx.config.data.train_split,
            # The labels' digest covers the CAMs, the thresholds and the CRF.
            "labels": self.labels_digest(ctx),
        }

    def label_settings(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config.train_irn
        crf = IRN_LABEL_CRF.as_dict() if config.crf else None
        return {"fg_threshold": config.fg_threshold, "bg_threshold": config.bg_threshold, "crf": crf}

    def labeller(self, ctx: StageContext) -> CamLabeller:
        config = ctx.config.train_irn
        crf = IRN_LABEL_CRF if config.crf else None

        def make_labels(image_id: str, image: np.ndarray, cam: dict[str, np.ndarray]) -> np.ndarray:
            return relation_label_map(
                image, cam["high_res"], cam["keys"], config.fg_threshold, config.bg_threshold, crf=crf
            )

        return make_labels

    def build_model(self, ctx: StageContext) -> nn.Module:
        config = ctx.config.train_irn
        torch.manual_seed(ctx.seed)  # the same branch init on every rank and every rerun
        return build_irnet(config.backbone, config.weights, config.freeze_backbone)

    def loss_function(self, ctx: StageContext, model: nn.Module) -> LossFunction:
        offsets = pair_offsets(ctx.config.train_irn.radius)
        world_size = ctx.dist.world_size

        def loss_fn(
            network: nn.Module, batch: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            boundary, displacement = network(batch["image"])
            return irn_loss(boundary, displacement, batch["label"], offsets, world_size)

        return loss_fn
