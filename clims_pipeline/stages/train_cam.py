"""Stage ``train_cam``: the baseline CAM network that CLIMS starts from (IRN-style ResNet-50 CAM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import StageContext, register_stage
from ..networks import build_network
from ..training import build_train_dataset, check_training_data, train_network


def multilabel_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(batch["image"])
    return F.multilabel_soft_margin_loss(logits.float(), batch["label"]), {}


@register_stage(
    "train_cam",
    order=10,
    help="train the baseline CAM network (GAP + multilabel soft-margin loss)",
    preflight=check_training_data,
)
def run(ctx: StageContext) -> None:
    dataset = build_train_dataset(ctx)
    network_config = ctx.config.network
    torch.manual_seed(ctx.seed)  # the same classifier init on every rank and on every rerun
    model = build_network("cam", network_config.backbone, network_config.weights, ctx.source.num_classes)
    meta = {
        "network": {"backbone": network_config.backbone, "weights": network_config.weights},
        "dataset": ctx.config.dataset,
        "train_split": ctx.config.data.train_split,
        "crop_size": ctx.config.data.crop_size,
    }
    train_network(ctx, "train_cam", model, dataset, ctx.config.train_cam, multilabel_loss, meta)
