"""Stage ``train_clims``: the CLIMS network, initialised from ``train_cam``, trained with CLIP's supervision.

The loss is the frozen-CLIP ``CLIPTextDrivenEvaluator`` of ``clims_loss`` (OTM + BTM + CBS + REG, Eq. 13); the
``--variant`` picks the prompt preset (class names, backgrounds, CBS form, loss weights) and the schedule.
Under ``torchrun`` each rank's loss is ``clims_loss.data_parallel_loss``, so that DDP's averaged gradient
equals one process's on the global batch.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

import clims_loss as cl

from ..clip_setup import (
    build_evaluator,
    clip_identity,
    clip_inputs,
    registry_identity,
    resolve_backgrounds,
)
from ..collapse_alarm import CollapseAlarm, baseline_activation, check_alarm_settings, reference_indices
from ..config import TrainConfig
from ..context import StageContext, register_stage
from ..distributed import all_reduce_sum
from ..networks import build_network
from ..training import (
    LossFunction,
    StepHook,
    TrainerStage,
    build_train_dataset,
    check_training_data,
    data_fingerprint,
    final_model_path,
    load_final_model,
    model_digest,
)


def registry(ctx: StageContext) -> cl.BackgroundPromptRegistry:
    prompts, _ = resolve_backgrounds(ctx)
    assert prompts is not None  # must_exist=True returns a registry or raises
    return prompts


def collapse_alarm(ctx: StageContext) -> CollapseAlarm | None:
    """This run's alarm (docs/readiness.md), with the baseline's activation measured now; None when off."""
    config = ctx.config.train_clims.collapse_alarm
    if not config.enabled:
        return None
    dataset = build_train_dataset(ctx)
    indices = reference_indices(dataset.labels, config.reference_images)
    baseline = build_network("clims", ctx.config.network.backbone, "none", ctx.source.num_classes)
    load_final_model(final_model_path(ctx, "train_cam"), baseline)  # the CLIMS network's starting point
    keys = [(0, index) for index in indices[ctx.dist.rank :: ctx.dist.world_size]]  # epoch-0 crops
    train = ctx.config.train_clims.train
    reference = baseline_activation(
        baseline.to(ctx.device), dataset, keys, ctx.source.num_classes, train.batch_size, ctx.device
    )
    names = ctx.source.class_names
    ctx.logger("train_clims").log(
        "collapse_reference",
        images=len(indices),
        positive={n: round(float(v), 6) for n, v in zip(names, reference.positive_mean, strict=True)},
    )
    return CollapseAlarm(names, reference, config, train.log_every, ctx.logger("train_clims"), ctx.print)


@register_stage
class TrainClims(TrainerStage):
    name, order, help = "train_clims", 20, "train the CLIMS network with the CLIP text-driven evaluator"
    _alarm: CollapseAlarm | None = None

    def inputs(self, ctx: StageContext) -> tuple[str, ...]:
        return ("train_cam", *clip_inputs(ctx))

    def check(self, ctx: StageContext) -> None:
        check_training_data(ctx)
        check_alarm_settings(ctx.config.train_clims.collapse_alarm)
        # A missing or invalid --backgrounds file stops the run before any training (a mined file may still
        # be written by stage mine_backgrounds in this run).
        prompts, _ = resolve_backgrounds(ctx, must_exist="mine_backgrounds" not in ctx.requested_stages)
        given = ctx.config.train_clims.loss_weights
        weights = cl.LossWeights(**given) if given else prompts.weights if prompts is not None else None
        if prompts is not None and weights is not None and weights.cbs != 0 and not prompts.uses_cbs:
            raise ValueError(
                f"train_clims: the prompt registry {prompts.name!r} has no background terms but the CBS "
                f"weight is {weights.cbs}: add backgrounds (--backgrounds FILE or mined, or edit the file "
                "of --write-registry) or set the weight to 0 (--set train_clims.loss_weights=...)"
            )

    def train_config(self, ctx: StageContext) -> TrainConfig:
        return ctx.config.train_clims.train

    def fingerprint(self, ctx: StageContext) -> dict[str, Any]:
        prompts, backgrounds = resolve_backgrounds(ctx)
        assert prompts is not None
        given = ctx.config.train_clims.loss_weights
        weights = cl.LossWeights(**given) if given else prompts.weights
        return {
            "init": model_digest(ctx, "train_cam"),
            "network": asdict(ctx.config.network),
            "data": data_fingerprint(ctx),
            "prompts": ctx.config.train_clims.prompts,
            **registry_identity(ctx),
            "backgrounds": backgrounds,
            "loss_weights": weights.as_dict(),
            "clip": clip_identity(ctx),
            "variant": ctx.config.variant,
        }

    def build_model(self, ctx: StageContext) -> nn.Module:
        network = ctx.config.network
        model = build_network("clims", network.backbone, "none", ctx.source.num_classes)
        load_final_model(final_model_path(ctx, "train_cam"), model)  # CLIMS starts from the CAM net
        return model

    def loss_function(self, ctx: StageContext, model: nn.Module) -> LossFunction:
        prompts, backgrounds = resolve_backgrounds(ctx)
        assert prompts is not None
        evaluator = build_evaluator(ctx, prompts)
        ctx.print(
            "[train_clims] prompts: "
            + "; ".join(
                f"{name} -> {prompt!r}"
                for name, prompt in zip(
                    ctx.source.class_names, evaluator.prompts.object_prompts(), strict=True
                )
            )
        )
        ctx.logger(self.name).log(
            "evaluator",
            object_prompts=evaluator.prompts.object_prompts(),
            prompts=ctx.config.train_clims.prompts,
            backgrounds=backgrounds,
            background_terms={
                c: list(evaluator.prompts.backgrounds_for(c)) for c in evaluator.prompts.class_names
            },
            weights=evaluator.weights.as_dict(),
            clip=ctx.config.train_clims.clip,
            clip_pretrained=ctx.config.train_clims.clip_pretrained,
        )
        world_size = ctx.dist.world_size
        alarm = self._alarm = collapse_alarm(ctx)

        def clims_loss(
            network: nn.Module, batch: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            maps = network(batch["image"]).float()
            if alarm is not None:
                alarm.observe(maps, batch["label"])
            out = evaluator(batch["image"], maps, batch["label"])
            loss = cl.data_parallel_loss(out, evaluator, world_size, all_reduce_sum)
            return loss, {"otm": out.otm, "btm": out.btm, "cbs": out.cbs, "reg": out.reg}

        return clims_loss

    def after_step(self, ctx: StageContext) -> StepHook | None:
        return None if self._alarm is None else self._alarm.after_step
