"""Stage ``train_clims``: the CLIMS network, initialised from ``train_cam``, trained with CLIP's supervision.

The loss is the frozen-CLIP ``CLIPTextDrivenEvaluator`` of ``clims_loss`` (OTM + BTM + CBS + REG, Eq. 13); the
``--variant`` picks the prompt preset (class names, backgrounds, CBS form, loss weights) and the schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TINY_CLIP_NAME
from ..context import StageContext, register_stage
from ..distributed import all_reduce_sum
from ..networks import build_network
from ..training import (
    build_train_dataset,
    check_training_data,
    final_model_path,
    load_final_model,
    train_network,
)
from .mine_backgrounds import check_finished_model, preflight_backgrounds, resolve_backgrounds

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def register_clip_configs(extra_config: str | None = None) -> None:
    """Make the tiny CLIP config shipped with the examples (and an optional user JSON) known to open_clip."""
    import open_clip

    for path in (CONFIG_DIR / f"{TINY_CLIP_NAME}.json", *([Path(extra_config)] if extra_config else [])):
        if not path.is_file():
            raise FileNotFoundError(f"--clip-config: no such open_clip model config: {path}")
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)


def build_evaluator(ctx: StageContext) -> Any:
    import clims_loss as cl

    from ..clip_training import register_model_configs
    from .train_clip import resolve_clip_pretrained

    register_model_configs()  # the tiny toy-world CLIP (clip_configs/)

    clims_config = ctx.config.train_clims
    register_clip_configs(getattr(ctx.args, "clip_config", None))
    prompts, _ = resolve_backgrounds(ctx)  # the variant's registry, or its backgrounds from --backgrounds
    if tuple(prompts.class_names) and len(prompts.class_names) != ctx.source.num_classes:
        raise ValueError(
            f"prompt preset {clims_config.prompts!r} has {len(prompts.class_names)} classes, the "
            f"{ctx.config.dataset} data {ctx.source.num_classes}"
        )
    weights = cl.LossWeights(**clims_config.loss_weights) if clims_config.loss_weights else None
    clip_pretrained = resolve_clip_pretrained(ctx)  # "train_clip": the file stage train_clip wrote
    pretrained = None if clip_pretrained in ("", "none", None) else clip_pretrained
    # Every rank builds the same CLIP: random weights (tests) are seeded identically.
    torch.manual_seed(ctx.seed)
    return cl.CLIPTextDrivenEvaluator.from_pretrained(
        clims_config.clip,
        pretrained=pretrained,
        prompts=prompts,
        weights=weights,
        device=ctx.device,
        image_mean=cl.IMAGENET_MEAN,  # how the pipeline normalises its images
        image_std=cl.IMAGENET_STD,
    )


def data_parallel_loss(out: Any, evaluator: Any, world_size: int) -> torch.Tensor:
    """This rank's CLIMS loss, rescaled so that DDP's average of the ranks' gradients equals the gradient
    of one process on the whole global batch.

    The ranks hold different numbers of positive (image, class) pairs, so a term averaged over a rank's
    pairs (OTM/BTM with ``pair_reduction="mean"``, a mean CBS, a positive-only REG) is weighted by the
    rank's share of all pairs, and a term summed over pairs by the number of ranks. REG over all ``B x K``
    maps averages as many maps on every rank and needs nothing. Costs one all-reduce of a scalar per step.
    """
    if world_size == 1:
        return out.loss  # type: ignore[no-any-return]
    local_pairs = torch.tensor(float(out.batch_index.numel()), device=out.loss.device)
    all_pairs = all_reduce_sum(local_pairs.clone()).clamp_min(1.0)
    mean_scale = local_pairs * world_size / all_pairs
    prompts, weights = evaluator.prompts, evaluator.weights

    def scale(reduction: str) -> torch.Tensor | float:
        return mean_scale if reduction == "mean" else float(world_size)

    reg_scale = mean_scale if prompts.reg_positive_only else 1.0
    return (  # type: ignore[no-any-return]
        weights.otm * out.otm * scale(prompts.pair_reduction)
        + weights.btm * out.btm * scale(prompts.pair_reduction)
        + weights.cbs * out.cbs * scale(prompts.cbs_reduction)
        + weights.reg * out.reg * reg_scale
    )


def preflight(ctx: StageContext) -> None:
    check_training_data(ctx)
    preflight_backgrounds(ctx)


@register_stage(
    "train_clims",
    order=20,
    help="train the CLIMS network with the CLIP text-driven evaluator",
    preflight=preflight,
)
def run(ctx: StageContext) -> None:
    _, backgrounds = resolve_backgrounds(ctx)  # the toy world's prompts are resolved there too
    if final_model_path(ctx, "train_clims").exists() and not ctx.force:
        check_finished_model(ctx, final_model_path(ctx, "train_clims"), backgrounds)
        ctx.print(
            f"[train_clims] done already: {final_model_path(ctx, 'train_clims')} (use --force to retrain)"
        )
        return
    dataset = build_train_dataset(ctx)
    network_config = ctx.config.network
    model = build_network("clims", network_config.backbone, "none", ctx.source.num_classes)
    init_meta = load_final_model(final_model_path(ctx, "train_cam"), model)  # CLIMS starts from the CAM net
    evaluator = build_evaluator(ctx)
    ctx.logger("train_clims").log(
        "evaluator",
        prompts=ctx.config.train_clims.prompts,
        backgrounds=backgrounds,
        background_terms={
            c: list(evaluator.prompts.backgrounds_for(c)) for c in evaluator.prompts.class_names
        },
        weights=evaluator.weights.as_dict(),
        clip=ctx.config.train_clims.clip,
        clip_pretrained=ctx.config.train_clims.clip_pretrained,
    )

    def clims_loss(
        network: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        maps = network(batch["image"]).float()
        out = evaluator(batch["image"], maps, batch["label"])
        return data_parallel_loss(out, evaluator, ctx.dist.world_size), {
            "otm": out.otm,
            "btm": out.btm,
            "cbs": out.cbs,
            "reg": out.reg,
        }

    meta = {
        "init": {"steps": init_meta.get("steps")},
        "prompts": ctx.config.train_clims.prompts,
        # A resumed run must use the same background prompts. Left out for the preset, so that checkpoints
        # written before --backgrounds existed still resume.
        **({} if backgrounds["backgrounds"] == "preset" else {"backgrounds": backgrounds}),
        "loss_weights": evaluator.weights.as_dict(),
        "clip": ctx.config.train_clims.clip,
        "clip_pretrained": ctx.config.train_clims.clip_pretrained,
        "variant": ctx.config.variant,
        "crop_size": ctx.config.data.crop_size,
    }
    train_network(ctx, "train_clims", model, dataset, ctx.config.train_clims.train, clims_loss, meta)
