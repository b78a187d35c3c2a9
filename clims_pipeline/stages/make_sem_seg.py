"""Stage ``make_sem_seg``: CAMs refined by IRNet's boundary-driven random walk into semantic pseudo masks,
and their mIoU ("+IRNet").

For every image of the training and evaluation splits: IRNet (``train_irn``) gives the class-boundary map of
the image and its mirror image on the stride-4 grid; its affinities within radius 5 (``1 - max`` boundary on
the line between two pixels) give ``T = D^-1 A^beta``; the stride-4 CAMs (``make_cam``'s ``cam`` maps) times
``1 - boundary`` are walked ``2^exponent`` steps, upsampled, divided by their maximum and compared with the
background score ``make_sem_seg.background_threshold``; the arg-max is saved as a palette PNG in
``<workdir>/make_sem_seg/masks/`` (the pseudo masks of ``train_seg`` with ``refine.method=irn``). The mIoU on
the evaluation split goes to ``results.json`` under ``irn`` with every setting that produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cams import cam_digest, cam_directory, load_cam_file, resolve_cam_source
from ..context import StageContext, register_stage
from ..data import normalize_image
from ..files import save_png
from ..irnet import IRNet, boundary_map, build_irnet, semantic_labels
from ..label_maps import (
    PseudoMaskStage,
    evaluate_pseudo_masks,
    palette_image,
    refinement_image_ids,
    sem_seg_mask_directory,
    write_pseudo_masks,
)
from ..training import autocast_context, final_model_path, load_final_model, model_digest

STAGE = "make_sem_seg"


def write_sem_seg_mask(ctx: StageContext, model: IRNet, cam_dir: Path, out_dir: Path, image_id: str) -> None:
    """IRNet's semantic pseudo mask of one image, as a palette PNG."""
    config = ctx.config.make_sem_seg
    pil_image = ctx.source.load_image(image_id)
    cam = load_cam_file(cam_dir / f"{image_id}.npy")
    with torch.no_grad(), autocast_context(ctx.device, ctx.amp):
        tensor = torch.from_numpy(normalize_image(pil_image)).to(ctx.device)
        boundary = boundary_map(model, tensor).float()
    labels = semantic_labels(
        boundary,
        torch.from_numpy(cam["cam"]).to(ctx.device),
        np.asarray(cam["keys"], dtype=np.int64),
        (pil_image.height, pil_image.width),
        beta=config.beta,
        exponent=config.exponent,
        radius=config.radius,
        background_threshold=config.background_threshold,
    )
    save_png(out_dir / f"{image_id}.png", palette_image(labels))


@register_stage
class MakeSemSeg(PseudoMaskStage):
    name, order = STAGE, 64
    help = "IRNet's boundary-driven random walk: semantic pseudo masks (palette PNG) and their mIoU (+IRNet)"

    reads = ("make_cam", "train_irn")
    method = "irn"

    def run(self, ctx: StageContext) -> None:
        make_sem_seg(ctx)


def make_sem_seg(ctx: StageContext) -> None:
    config = ctx.config.make_sem_seg
    source = resolve_cam_source(ctx)
    cam_dir = cam_directory(ctx, source)
    image_ids = refinement_image_ids(ctx)
    fingerprint: dict[str, Any] = {
        "model": model_digest(ctx, "train_irn"),
        "cams": cam_digest(ctx),
        "beta": config.beta,
        "exponent": config.exponent,
        "radius": config.radius,
        "background_threshold": config.background_threshold,
    }
    output = ctx.output(STAGE, sem_seg_mask_directory(ctx), fingerprint)
    irn = ctx.config.train_irn
    model = build_irnet(irn.backbone, "none", irn.freeze_backbone)
    load_final_model(final_model_path(ctx, "train_irn"), model)
    model.to(ctx.device).eval()
    inferred = write_pseudo_masks(
        ctx,
        output,
        image_ids,
        STAGE,
        irn.backbone != "resnet50",
        lambda image_id: write_sem_seg_mask(ctx, model, cam_dir, output.directory, image_id),
    )

    settings = {
        "cam_source": source,
        "beta": config.beta,
        "exponent": config.exponent,
        "steps": 2**config.exponent,
        "radius": config.radius,
        "background_threshold": config.background_threshold,
        "relation_labels": {
            "thresholds": [irn.fg_threshold, irn.bg_threshold],
            "crf": irn.crf,
        },
        "backbone": irn.backbone,
    }
    described = (
        f"beta {config.beta}, 2^{config.exponent} steps, background threshold {config.background_threshold}, "
        f"relation labels {irn.fg_threshold}/{irn.bg_threshold} {'with' if irn.crf else 'no'} CRF"
    )
    title = "Pseudo-mask mIoU: CAM + IRNet (boundary random walk)"
    result = evaluate_pseudo_masks(ctx, STAGE, output.directory, "irn", settings, title, described)
    ctx.logger(STAGE).log("done", miou=result["miou"], images=len(image_ids), inferred=inferred)
