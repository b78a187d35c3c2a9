"""Stage ``eval_seg``: DeepLabV2 mIoU on ``val`` (multi-scale + flip, optional dense CRF), test predictions.

Every image of the evaluation split (``eval_seg.split``, ``val``) is segmented at the test scales and their
mirror images (softmax averaged); with ``eval_seg.crf`` the dense CRF of deeplab-pytorch (10 iterations,
POS 3/1, BI 4/67/3) post-processes the result. Predictions are palette PNGs in ``<workdir>/eval_seg/<split>/``
(and ``<split>_crf/``); the mIoU with and without CRF, the per-class table and the settings go to
``results.json`` under ``seg``. When the test list exists, its predictions are written in the VOC evaluation
server's layout: ``<workdir>/eval_seg/submission/results/VOC2012/Segmentation/comp6_test_cls/<id>.png``
(comp6: trained with outside data, i.e. ImageNet/COCO initialisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import EvalSegConfig
from ..context import Stage, StageContext, register_stage
from ..crf import DEEPLAB_CRF, dense_crf
from ..data import DatasetError, normalize_image
from ..deeplab import MSC, build_deeplab, multiscale_probabilities
from ..files import atomic_write, save_png
from ..label_maps import palette_image, per_class, segmentation_confusion, training_mask_stage
from ..metrics import format_iou_table, iou_from_confusion, mean_iou
from ..runstate import StageOutput, verify_file
from ..training import autocast_context, final_model_path, load_final_model, model_digest, small_op_threads

SUBMISSION_SUBDIR = Path("submission") / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"


def test_image_ids(ctx: StageContext) -> list[str]:
    """The test split's ids, or [] when it is not configured or its list is absent."""
    split = ctx.config.eval_seg.test_split
    if not split:
        return []
    try:
        return ctx.validate_split(split)
    except DatasetError:
        return []


def load_segmentation_network(ctx: StageContext) -> MSC:
    config = ctx.config.train_seg
    model = build_deeplab(ctx.source.num_classes + 1, config.backbone, "none", config.msc_scales)
    load_final_model(final_model_path(ctx, "train_seg"), model)
    return model.to(ctx.device).eval()


def predict(
    ctx: StageContext, model: MSC, output: StageOutput, image_ids: list[str], split: str, crf: bool
) -> tuple[Path, Path | None, list[Path]]:
    """Write the prediction (and the CRF-refined one) of every image of ``split`` that has none yet (or one
    of another size than the manifest recorded), sharded over ranks; return the two directories and every
    prediction file (for ``finish_files``)."""
    out_dir = output.directory / split
    crf_dir = output.directory / f"{split}_crf" if crf else None

    def paths_of(image_id: str) -> tuple[Path, ...]:
        return tuple(directory / f"{image_id}.png" for directory in (out_dir, crf_dir) if directory)

    todo = output.todo(image_ids, paths_of, f"{split} predictions")
    with small_op_threads(ctx, ctx.config.train_seg.backbone == "tiny"):
        for image_id in tqdm(
            output.share(todo), desc=f"eval_seg {split}", disable=not ctx.dist.is_main, dynamic_ncols=True
        ):
            predict_one(ctx, model, image_id, out_dir, crf_dir)
    return out_dir, crf_dir, [path for image_id in image_ids for path in paths_of(image_id)]


def copy_file(source: Path, target: Path) -> None:
    verify_file(source)
    data = source.read_bytes()
    atomic_write(target, lambda file: file.write(data))


def predict_one(ctx: StageContext, model: MSC, image_id: str, out_dir: Path, crf_dir: Path | None) -> None:
    """Multi-scale + flip prediction of one image (and its CRF refinement) as palette PNGs."""
    config = ctx.config.eval_seg
    pil_image = ctx.source.load_image(image_id)
    tensor = torch.from_numpy(normalize_image(pil_image))[None].to(ctx.device)
    with autocast_context(ctx.device, ctx.amp):
        probabilities = multiscale_probabilities(model, tensor, config.scales, config.flip).cpu().numpy()
    save_png(out_dir / f"{image_id}.png", palette_image(probabilities.argmax(axis=0).astype(np.uint8)))
    if crf_dir is not None:
        refined = dense_crf(np.asarray(pil_image), probabilities, DEEPLAB_CRF)
        save_png(crf_dir / f"{image_id}.png", palette_image(refined.argmax(axis=0).astype(np.uint8)))


@register_stage
class EvalSeg(Stage):
    name, order = "eval_seg", 80
    help = "DeepLabV2 mIoU on val (multi-scale + flip, optional CRF), per-class table, test predictions"
    reads = ("train_seg",)

    def check(self, ctx: StageContext) -> None:
        ctx.validate_split(ctx.config.eval_seg.split, need_masks=True)

    def uses_crf(self, ctx: StageContext) -> bool:
        return ctx.config.eval_seg.crf

    def run(self, ctx: StageContext) -> None:
        evaluate_segmentation(ctx, ctx.config.eval_seg)


def evaluate_segmentation(ctx: StageContext, config: EvalSegConfig) -> None:
    stage_dir = ctx.stage_dir("eval_seg")
    fingerprint = {
        "model": model_digest(ctx, "train_seg"),
        "scales": list(config.scales),
        "flip": config.flip,
        "crf": DEEPLAB_CRF.as_dict() if config.crf else None,
    }
    # Predictions of another model or other settings are never reused; those of this one are (resume).
    output = ctx.output("eval_seg", stage_dir / "predictions", fingerprint)
    split = config.split
    image_ids = ctx.validate_split(split, need_masks=True)
    model = load_segmentation_network(ctx)
    output.begin()
    out_dir, crf_dir, written = predict(ctx, model, output, image_ids, split, config.crf)
    test_ids = test_image_ids(ctx)
    if test_ids:
        test_dir, test_crf_dir, test_written = predict(
            ctx, model, output, test_ids, config.test_split, config.crf
        )
        written += test_written
    # Sizes and hashes of every prediction: the mIoU below and the submission read them through verify_file.
    output.finish_files(written, lambda path: path, split=split, images=len(image_ids))

    class_names = ("background", *ctx.source.class_names)
    iou_plain = iou_from_confusion(segmentation_confusion(ctx, image_ids, out_dir, len(class_names)))
    iou_crf = (
        iou_from_confusion(segmentation_confusion(ctx, image_ids, crf_dir, len(class_names)))
        if crf_dir is not None
        else None
    )
    iou = iou_crf if iou_crf is not None else iou_plain
    result: dict[str, Any] = {
        "miou": round(100 * mean_iou(iou), 2),
        "miou_no_crf": round(100 * mean_iou(iou_plain), 2),
        "miou_crf": None if iou_crf is None else round(100 * mean_iou(iou_crf), 2),
        "per_class": per_class(class_names, iou),
        "split": split,
        "images": len(image_ids),
        "scales": list(config.scales),
        "flip": config.flip,
        "crf": config.crf,
        "crf_params": DEEPLAB_CRF.as_dict() if config.crf else None,
        "backbone": ctx.config.train_seg.backbone,
        "init_weights": ctx.config.train_seg.weights,
        "mask_source": training_mask_stage(ctx) or "ground_truth",
        "train_split": ctx.config.data.train_split,
        "predictions": str(out_dir if crf_dir is None else crf_dir),
        "units": "percent",
    }

    if test_ids:
        submission = stage_dir / SUBMISSION_SUBDIR
        if ctx.dist.is_main:
            chosen = test_crf_dir if test_crf_dir is not None else test_dir
            for image_id in test_ids:
                copy_file(chosen / f"{image_id}.png", submission / f"{image_id}.png")
        result["test_submission"] = {
            "split": config.test_split,
            "images": len(test_ids),
            "dir": str(submission),
        }
    ctx.update_results({"seg": result}, stage="eval_seg")
    summary = (
        f"seg (DeepLabV2, {ctx.config.train_seg.backbone}, init {ctx.config.train_seg.weights}) on "
        f"{ctx.config.dataset} {split} ({len(image_ids)} images), scales {list(config.scales)}"
        f"{' + flip' if config.flip else ''}: mIoU {result['miou_no_crf']:.2f} without CRF"
        + (f", {result['miou_crf']:.2f} with CRF" if iou_crf is not None else "")
    )
    table = format_iou_table("Segmentation mIoU: DeepLabV2", class_names, iou, summary)
    if ctx.dist.is_main:
        atomic_write(stage_dir / "seg_table.md", lambda file: file.write((table + "\n").encode()))
    ctx.logger("eval_seg").log("done", miou=result["miou"], miou_no_crf=result["miou_no_crf"])
    ctx.print(table)
