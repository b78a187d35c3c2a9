"""Stage ``train_cam``: the baseline CAM network that CLIMS starts from (IRN-style ResNet-50 CAM)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..context import StageContext, register_stage
from ..networks import build_network
from ..training import LossFunction, TrainerStage, check_training_data, data_fingerprint


def multilabel_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(batch["image"])
    return F.multilabel_soft_margin_loss(logits.float(), batch["label"]), {}


@register_stage
class TrainCam(TrainerStage):
    name, order, help = "train_cam", 10, "train the baseline CAM network (GAP + multilabel soft-margin loss)"

    def check(self, ctx: StageContext) -> None:
        check_training_data(ctx)

    def train_config(self, ctx: StageContext) -> TrainConfig:
        return ctx.config.train_cam

    def fingerprint(self, ctx: StageContext) -> dict[str, Any]:
        return {"network": asdict(ctx.config.network), "data": data_fingerprint(ctx)}

    def build_model(self, ctx: StageContext) -> nn.Module:
        torch.manual_seed(ctx.seed)  # the same classifier init on every rank and on every rerun
        network = ctx.config.network
        return build_network("cam", network.backbone, network.weights, ctx.source.num_classes)

    def loss_function(self, ctx: StageContext, model: nn.Module) -> LossFunction:
        return multilabel_loss
