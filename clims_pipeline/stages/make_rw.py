"""Stage ``make_rw``: CAMs refined by PSA's random walk into pseudo masks, and their mIoU ("+RW").

For every image of the training and evaluation splits: the CAMs (``make_cam``) get PSA's background score
``(1 - max CAM)^16``, AffinityNet (``train_aff``) gives the affinities of the image, the transition matrix
``T = D^-1 A^beta`` propagates the scores ``2^exponent`` steps, the optional dense CRF refines them, and the
arg-max is saved as a palette PNG in ``<workdir>/make_rw/masks/`` (the pseudo masks of ``train_seg``).
The mIoU on the evaluation split goes to ``results.json`` under ``rw`` with every setting that produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cams import cam_digest, cam_directory, load_cam_file, resolve_cam_source
from ..config import MakeRWConfig
from ..context import StageContext, register_stage
from ..crf import PSA_CRF
from ..data import normalize_image
from ..files import save_png
from ..label_maps import (
    PseudoMaskStage,
    evaluate_pseudo_masks,
    palette_image,
    pseudo_mask_directory,
    refinement_image_ids,
    write_pseudo_masks,
)
from ..random_walk import AffinityNet, build_affinity_net, pad_to_stride, random_walk_labels
from ..training import autocast_context, final_model_path, load_final_model, model_digest


def write_pseudo_mask(
    ctx: StageContext, model: AffinityNet, cam_dir: Path, out_dir: Path, image_id: str
) -> None:
    """Random walk (and optional CRF) of one image's CAMs; the arg-max as a palette PNG."""
    pil_image = ctx.source.load_image(image_id)
    cam = load_cam_file(cam_dir / f"{image_id}.npy")
    with torch.no_grad(), autocast_context(ctx.device, ctx.amp):
        tensor = torch.from_numpy(normalize_image(pil_image))[None].to(ctx.device)
        features = model(pad_to_stride(tensor, model.stride))[0].float()
    labels = random_walk_labels(
        np.asarray(pil_image), cam["high_res"], cam["keys"], features, ctx.config.make_rw, model.stride
    )
    save_png(out_dir / f"{image_id}.png", palette_image(labels))


@register_stage
class MakeRW(PseudoMaskStage):
    name, order = "make_rw", 60
    help = "random walk with AffinityNet's affinities: pseudo masks (palette PNG) and their mIoU (+RW)"

    reads = ("make_cam", "train_aff")
    method = "psa"

    def uses_crf(self, ctx: StageContext) -> bool:
        return ctx.config.make_rw.crf

    def run(self, ctx: StageContext) -> None:
        walk_and_evaluate(ctx, ctx.config.make_rw)


def walk_and_evaluate(ctx: StageContext, config: MakeRWConfig) -> None:
    source = resolve_cam_source(ctx)
    cam_dir = cam_directory(ctx, source)
    image_ids = refinement_image_ids(ctx)
    fingerprint: dict[str, Any] = {
        "model": model_digest(ctx, "train_aff"),
        "cams": cam_digest(ctx),
        "beta": config.beta,
        "exponent": config.exponent,
        "background_power": config.background_power,
        "radius": config.radius,
        "crf": PSA_CRF.as_dict() if config.crf else None,
    }
    output = ctx.output("make_rw", pseudo_mask_directory(ctx), fingerprint)
    model = build_affinity_net(ctx.config.train_aff.backbone, "none", ctx.config.train_aff.feature_stride)
    load_final_model(final_model_path(ctx, "train_aff"), model)
    model.to(ctx.device).eval()
    inferred = write_pseudo_masks(
        ctx,
        output,
        image_ids,
        "make_rw",
        ctx.config.train_aff.backbone == "tiny",
        lambda image_id: write_pseudo_mask(ctx, model, cam_dir, output.directory, image_id),
    )

    settings = {
        "cam_source": source,
        "beta": config.beta,
        "exponent": config.exponent,
        "steps": 2**config.exponent,
        "background_power": config.background_power,
        "radius": config.radius,
        "crf": config.crf,
        "crf_params": PSA_CRF.as_dict() if config.crf else None,
        "feature_stride": ctx.config.train_aff.feature_stride,
        "affinity_labels": {
            "source": ctx.config.train_aff.label_source,
            "powers": [ctx.config.train_aff.low_power, ctx.config.train_aff.high_power],
            "crf": ctx.config.train_aff.crf,
        },
    }
    described = (
        f"beta {config.beta}, 2^{config.exponent} steps, background power {config.background_power}, "
        f"{'with' if config.crf else 'no'} CRF"
    )
    title = "Pseudo-mask mIoU: CAM + random walk"
    result = evaluate_pseudo_masks(ctx, "make_rw", output.directory, "rw", settings, title, described)
    ctx.logger("make_rw").log("done", miou=result["miou"], images=len(image_ids), inferred=inferred)
