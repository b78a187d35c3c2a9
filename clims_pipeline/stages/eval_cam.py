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
from typing import Any

import numpy as np
import torch

import clims_loss as cl

from ..cams import cam_directory, foreground_prediction, limited, load_cam_file, resolve_cam_source
from ..config import EvalCamConfig
from ..context import Stage, StageContext, register_stage
from ..data import VOID_LABEL, DatasetError, multi_hot
from ..distributed import all_reduce_sum
from ..files import atomic_write, save_png
from ..label_maps import per_class
from ..metrics import ThresholdSweep, format_iou_table, iou_from_confusion, mean_iou
from ..runstate import read_manifest
from ..visualize import cam_overlay_grid, cam_overlay_panel

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
        if ctx.config.eval_cam.overlay_size < 16:
            raise ValueError(
                f"eval_cam.overlay_size: expected at least 16 pixels, got {ctx.config.eval_cam.overlay_size}"
            )

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
    num_classes = ctx.source.num_classes
    baseline_dir = cam_directory(ctx, "train_cam")
    compare = source == "train_clims" and bool((read_manifest(baseline_dir) or {}).get("complete"))
    activation = cl.ClassActivation.zeros(num_classes)
    baseline = cl.ClassActivation.zeros(num_classes)
    for image_id in image_ids[ctx.dist.rank :: ctx.dist.world_size]:
        ground_truth = ctx.source.load_mask(image_id)
        cam = load_cam_file(cam_dir / f"{image_id}.npy")
        activation = activation + cam_activation(cam, num_classes)
        if compare:
            baseline = baseline + cam_activation(load_cam_file(baseline_dir / f"{image_id}.npy"), num_classes)
        predicted_class, score = foreground_prediction(cam)
        if predicted_class.shape != ground_truth.shape:
            raise DatasetError(
                f"CAM {cam_dir / image_id}.npy is {predicted_class.shape} but mask "
                f"{ctx.source.mask_path(image_id)} is {ground_truth.shape}"
            )
        sweep.add(ground_truth, predicted_class, score)
    histogram = all_reduce_sum(torch.from_numpy(sweep.histogram))
    sweep.histogram = histogram.numpy()
    activation = cl.ClassActivation.from_tensor(all_reduce_sum(activation.as_tensor()))
    baseline = cl.ClassActivation.from_tensor(all_reduce_sum(baseline.as_tensor()))

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
        "mean_activation": _rounded(ctx.source.class_names, activation.positive_mean),
    }
    warnings = sweep_warnings(sweep, best, thresholds, class_names, config)
    if compare:
        check = cl.detect_collapse(
            activation, baseline, fraction=ctx.config.train_clims.collapse_alarm.fraction, flood_level=None
        )
        result["collapsed"] = check.collapsed_classes(ctx.source.class_names)
        result["baseline_mean_activation"] = _rounded(ctx.source.class_names, baseline.positive_mean)
        warnings += [
            f"{m} (CAMs of {split}, against make_cam/train_cam)"
            for m in check.messages(ctx.source.class_names)
        ]
    result["warnings"] = warnings
    ctx.update_results({key: result}, stage="eval_cam")
    summary = (
        f"{key} ({source}) on {ctx.config.dataset} {split} ({len(image_ids)} images, no CRF): mIoU "
        f"{result['miou']:.2f} at the best background threshold {result['threshold']:.2f}; "
        f"{result['miou_at_reference_threshold']:.2f} at {result['reference_threshold']:.2f}"
    )
    table = format_iou_table(f"CAM mIoU: {key}", class_names, iou, summary)
    if ctx.dist.is_main:
        atomic_write(out_dir / f"{key}_table.md", lambda file: file.write((table + "\n").encode()))
        _write_overlays(ctx, image_ids, cam_dir, overlay_dir, float(thresholds[best]), key)
    ctx.logger("eval_cam").log("done", key=key, miou=result["miou"], threshold=result["threshold"])
    ctx.print(table)
    for warning in warnings:
        ctx.print(f"[eval_cam] WARNING: {warning}")
    ctx.print(f"[eval_cam] CAM overlays (image | CAM | prediction | ground truth, per class): {overlay_dir}")


def cam_activation(cam: dict[str, np.ndarray], num_classes: int) -> cl.ClassActivation:
    """The per-class activation of one CAM file (its labelled classes' low-resolution maps; the file holds no
    maps of other classes, so only ``positive_mean`` means anything)."""
    maps = np.zeros((1, num_classes, *cam["cam"].shape[1:]), dtype=np.float32)
    maps[0, np.asarray(cam["keys"], dtype=np.int64)] = np.clip(cam["cam"], 0.0, 1.0)
    labels = multi_hot(list(np.asarray(cam["keys"]).tolist()), num_classes)[None]
    return cl.class_activation(torch.from_numpy(maps), torch.from_numpy(labels), validate=False)


def _rounded(names: tuple[str, ...], values: torch.Tensor) -> dict[str, float | None]:
    return {n: None if np.isnan(float(v)) else round(float(v), 4) for n, v in zip(names, values, strict=True)}


def sweep_warnings(
    sweep: ThresholdSweep,
    best: int,
    thresholds: np.ndarray,
    class_names: tuple[str, ...],
    config: EvalCamConfig,
) -> list[str]:
    """What a reader of the table must not miss: classes that exist in the ground truth but were never
    predicted (their IoU is 0 because the maps are empty, e.g. collapsed, not because they are wrong), and a
    best threshold at an end of the sweep (the best may lie beyond it)."""
    warnings = []
    at_best, at_lowest = sweep.confusion_at(best), sweep.confusion_at(0)
    for label, name in enumerate(class_names[1:], start=1):
        if at_best[label].sum() > 0 and at_best[:, label].sum() == 0:
            anywhere = "" if at_lowest[:, label].sum() > 0 else f", nor at the lowest {thresholds[0]:.2f}"
            warnings.append(
                f"class {name!r} has no predicted pixel at the best threshold {thresholds[best]:.2f}"
                f"{anywhere} ({int(at_best[label].sum())} ground-truth pixels): its maps are empty "
                "(collapsed?), so its IoU of 0 says nothing about their shape; see the collapse warnings of "
                "train_clims"
            )
    if len(thresholds) > 1 and best in (0, len(thresholds) - 1):
        end, setting = ("lowest", "threshold_min") if best == 0 else ("highest", "threshold_max")
        warnings.append(
            f"the best background threshold {thresholds[best]:.2f} is the {end} of the sweep "
            f"[{thresholds[0]:.2f}, {thresholds[-1]:.2f}]: the best may lie beyond it; widen "
            f"eval_cam.{setting}"
        )
    return warnings


def _write_overlays(
    ctx: StageContext, image_ids: list[str], cam_dir: Path, out_dir: Path, threshold: float, key: str
) -> None:
    """A picture per chosen image (``<id>.png``: every labelled class's CAM by name) and one grid for the run
    (``../<key>_grid.png``), at ``eval_cam.overlay_size`` pixels per tile."""
    count = min(ctx.config.eval_cam.overlays, len(image_ids))
    if count <= 0:
        return
    size = ctx.config.eval_cam.overlay_size
    class_names = ("background", *ctx.source.class_names)
    chosen = [image_ids[int(i)] for i in np.linspace(0, len(image_ids) - 1, count).round()]
    grid: list[Any] = []
    for image_id in dict.fromkeys(chosen):
        image = np.asarray(ctx.source.load_image(image_id))
        ground_truth = ctx.source.load_mask(image_id)
        cam = load_cam_file(cam_dir / f"{image_id}.npy")
        predicted_class, score = foreground_prediction(cam)
        prediction = np.where(score > threshold, predicted_class, 0)
        keys = [int(k) for k in cam["keys"]]
        maps = np.clip(cam["high_res"], 0.0, 1.0)
        panel = cam_overlay_panel(
            image, maps, keys, prediction, ground_truth, class_names, image_id, threshold, size
        )
        save_png(out_dir / f"{image_id}.png", panel)
        grid.append((image_id, image, np.clip(score, 0.0, 1.0), prediction, ground_truth, keys))
    title = f"{key}: CAMs of {len(grid)} images, background threshold {threshold:.2f}"
    save_png(out_dir.parent / f"{key}_grid.png", cam_overlay_grid(grid, class_names, title, size))
