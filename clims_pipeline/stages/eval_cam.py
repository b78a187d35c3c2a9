"""Stage ``eval_cam``: CAM mIoU on the evaluation split, sweeping the background threshold.

A pixel is labelled with its highest-scoring positive class when that score exceeds the background threshold,
else background (the IRN/CLIMS protocol on the ``train`` split, 1,464 images). The best threshold is reported,
and the official repository's fixed threshold (0.15) too. Results go to ``results.json`` under ``cam`` (CAMs
of
the CLIMS network) or ``cam_baseline`` (CAMs of the baseline network), with a Markdown table and PNG overlays
in
``<workdir>/eval_cam/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cams import cam_directory, foreground_prediction, limited, load_cam_file, resolve_cam_source
from ..config import EvalCamConfig
from ..context import Stage, StageContext, register_stage
from ..data import VOID_LABEL, DatasetError
from ..distributed import all_reduce_sum
from ..files import atomic_write, save_png
from ..label_maps import per_class
from ..metrics import ThresholdSweep, format_iou_table, iou_from_confusion, mean_iou
from ..visualize import cam_overlay_panel

RESULT_KEYS = {"train_clims": "cam", "train_cam": "cam_baseline"}


@register_stage
class EvalCam(Stage):
    name, order, help = (
        "eval_cam",
        40,
        "CAM mIoU with a background-threshold sweep, per-class table, overlays",
    )

    reads = ("make_cam",)

    def check(self, ctx: StageContext) -> None:
        if has_masks(ctx):
            ctx.validate_split(ctx.config.data.eval_split, need_masks=True)

    def run(self, ctx: StageContext) -> None:
        if not has_masks(ctx):
            split = ctx.config.data.eval_split
            ctx.print(
                f"[eval_cam] skipped: the {ctx.config.dataset} data at {ctx.source.root} has no masks for "
                f"split {split!r} (add masks/<id>.png to measure CAM mIoU); the CAMs are in "
                f"{cam_directory(ctx)}"
            )
            ctx.logger(self.name).log("skipped", reason="no masks", split=split)
            return
        evaluate_cams(ctx, ctx.config.eval_cam)


def has_masks(ctx: StageContext) -> bool:
    return ctx.source.has_masks(ctx.config.data.eval_split)


def evaluate_cams(ctx: StageContext, config: EvalCamConfig) -> None:
    source = resolve_cam_source(ctx)
    cam_dir = cam_directory(ctx, source)
    split = ctx.config.data.eval_split
    image_ids = limited(ctx, ctx.validate_split(split, need_masks=True))
    thresholds = np.round(
        np.arange(
            config.threshold_min, config.threshold_max + config.threshold_step / 2, config.threshold_step
        ),
        6,
    )
    class_names = ("background", *ctx.source.class_names)
    sweep = ThresholdSweep(len(class_names), thresholds, void_label=VOID_LABEL)
    for image_id in image_ids[ctx.dist.rank :: ctx.dist.world_size]:
        ground_truth = ctx.source.load_mask(image_id)
        cam = load_cam_file(cam_dir / f"{image_id}.npy")
        predicted_class, score = foreground_prediction(cam)
        if predicted_class.shape != ground_truth.shape:
            raise DatasetError(
                f"CAM {cam_dir / image_id}.npy is {predicted_class.shape} but mask "
                f"{ctx.source.mask_path(image_id)} is {ground_truth.shape}"
            )
        sweep.add(ground_truth, predicted_class, score)
    histogram = all_reduce_sum(torch.from_numpy(sweep.histogram))
    sweep.histogram = histogram.numpy()

    curve = sweep.miou_per_threshold()
    best = int(np.nanargmax(curve))
    reference = int(np.abs(thresholds - config.reference_threshold).argmin())
    iou = iou_from_confusion(sweep.confusion_at(best))
    key = RESULT_KEYS[source]
    out_dir = ctx.stage_dir("eval_cam")
    overlay_dir = out_dir / "overlays" / key
    result = {
        "miou": round(100 * mean_iou(iou), 2),
        "threshold": float(thresholds[best]),
        "per_class": per_class(class_names, iou),
        "miou_at_reference_threshold": round(100 * float(curve[reference]), 2),
        "reference_threshold": float(thresholds[reference]),
        "miou_by_threshold": {
            f"{t:.2f}": round(100 * float(m), 2) for t, m in zip(thresholds, curve, strict=True)
        },
        "split": split,
        "images": len(image_ids),
        "source": source,
        "crf": False,
        "units": "percent",
        "overlays": str(overlay_dir),  # the report says where the pictures are
    }
    ctx.update_results({key: result}, stage="eval_cam")
    summary = (
        f"{key} ({source}) on {ctx.config.dataset} {split} ({len(image_ids)} images, no CRF): mIoU "
        f"{result['miou']:.2f} at the best background threshold {result['threshold']:.2f}; "
        f"{result['miou_at_reference_threshold']:.2f} at {result['reference_threshold']:.2f}"
    )
    table = format_iou_table(f"CAM mIoU: {key}", class_names, iou, summary)
    if ctx.dist.is_main:
        atomic_write(out_dir / f"{key}_table.md", lambda file: file.write((table + "\n").encode()))
        _write_overlays(ctx, image_ids, cam_dir, overlay_dir, float(thresholds[best]))
    ctx.logger("eval_cam").log("done", key=key, miou=result["miou"], threshold=result["threshold"])
    ctx.print(table)
    ctx.print(f"[eval_cam] CAM overlays (image | CAM | prediction | ground truth): {overlay_dir}")


def _write_overlays(
    ctx: StageContext, image_ids: list[str], cam_dir: Path, out_dir: Path, threshold: float
) -> None:
    count = min(ctx.config.eval_cam.overlays, len(image_ids))
    if count <= 0:
        return
    chosen = [image_ids[int(i)] for i in np.linspace(0, len(image_ids) - 1, count).round()]
    for image_id in dict.fromkeys(chosen):
        image = np.asarray(ctx.source.load_image(image_id))
        ground_truth = ctx.source.load_mask(image_id)
        predicted_class, score = foreground_prediction(load_cam_file(cam_dir / f"{image_id}.npy"))
        prediction = np.where(score > threshold, predicted_class, 0)
        save_png(out_dir / f"{image_id}.png", cam_overlay_panel(image, score, prediction, ground_truth))
