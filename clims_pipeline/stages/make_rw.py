"""Stage ``make_rw``: CAMs refined by PSA's random walk into pseudo masks, and their mIoU ("+RW").

For every image of the training and evaluation splits: the CAMs (``make_cam``) get PSA's background score
``(1 - max CAM)^16``, AffinityNet (``train_aff``) gives the affinities of the image, the transition matrix
``T = D^-1 A^beta`` propagates the scores ``2^exponent`` steps, the optional dense CRF refines them, and the
arg-max is saved as a palette PNG in ``<workdir>/make_rw/masks/`` (the pseudo masks of ``train_seg``).
The mIoU on the evaluation split goes to ``results.json`` under ``rw`` with every setting that produced it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..context import StageContext, register_stage
from ..crf import PSA_CRF, dense_crf
from ..data import VOID_LABEL, DatasetError, normalize_image
from ..distributed import all_reduce_sum, barrier, broadcast_object
from ..files import atomic_write, read_json, save_png, write_json
from ..metrics import confusion_matrix, format_iou_table, iou_from_confusion, mean_iou
from ..random_walk import background_scores, pad_to_stride, refine_cams_with_random_walk
from ..training import autocast_context, final_model_path, load_final_model
from .eval_cam import load_cam_file
from .make_cam import cam_directory, resolve_cam_source
from .train_aff import build_affinity_net, cam_fingerprint, check_crf, palette_image, read_label_png


@contextmanager
def small_op_threads(ctx: StageContext, tiny_network: bool) -> Iterator[None]:
    """One intra-op thread for per-image CPU inference of tiny networks, restored afterwards.

    Images differ in size, so every image pays the CPU kernels' per-shape set-up, and the random walk is many
    small operations: with threads this is spin-up overhead, not work (measured on a busy 2-core machine:
    pair affinities of one VOC image 2 s with 2 threads, 0.01 s with 1). Full-size networks keep all threads.
    """
    if ctx.device.type != "cpu" or not tiny_network:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def mask_directory(ctx: StageContext) -> Path:
    return ctx.workdir / "make_rw" / "masks"


def rw_image_ids(ctx: StageContext) -> list[str]:
    ids: dict[str, None] = {}
    for split in dict.fromkeys([ctx.config.data.train_split, ctx.config.data.eval_split]):
        ids.update(dict.fromkeys(ctx.validate_split(split, need_labels=True)))
    return list(ids)


def segmentation_confusion(
    ctx: StageContext, image_ids: list[str], prediction_dir: Path, num_labels: int
) -> np.ndarray:
    """Confusion matrix of saved label PNGs against the ground truth, summed over ranks."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for image_id in image_ids[ctx.dist.rank :: ctx.dist.world_size]:
        ground_truth = ctx.source.load_mask(image_id)
        prediction = read_label_png(prediction_dir / f"{image_id}.png")
        if prediction.shape != ground_truth.shape:
            raise DatasetError(
                f"prediction {prediction_dir / image_id}.png is {prediction.shape} but mask "
                f"{ctx.source.mask_path(image_id)} is {ground_truth.shape}"
            )
        confusion += confusion_matrix(ground_truth, prediction, num_labels, VOID_LABEL)
    return all_reduce_sum(torch.from_numpy(confusion)).numpy()


def per_class(class_names: tuple[str, ...], iou: np.ndarray) -> dict[str, float | None]:
    return {
        name: (None if np.isnan(value) else round(100 * float(value), 2))
        for name, value in zip(class_names, iou, strict=True)
    }


def write_pseudo_mask(
    ctx: StageContext, model: torch.nn.Module, cam_dir: Path, out_dir: Path, image_id: str
) -> None:
    """Random walk (and optional CRF) of one image's CAMs; the arg-max as a palette PNG."""
    config = ctx.config.make_rw
    pil_image = ctx.source.load_image(image_id)
    image = np.asarray(pil_image)
    cam = load_cam_file(cam_dir / f"{image_id}.npy")
    keys = np.asarray(cam["keys"], dtype=np.int64)
    class_of_channel = np.concatenate([[0], keys + 1])
    scores = torch.from_numpy(background_scores(cam["high_res"], config.background_power)).to(ctx.device)
    with torch.no_grad(), autocast_context(ctx.device, ctx.amp):
        tensor = torch.from_numpy(normalize_image(pil_image))[None].to(ctx.device)
        features = model(pad_to_stride(tensor))[0].float()
    walked = refine_cams_with_random_walk(features, scores, config.radius, config.beta, config.exponent)
    walked_scores = walked.clamp_min(0).cpu().numpy()
    if config.crf and len(keys):
        walked_scores = dense_crf(image, walked_scores, PSA_CRF)
    labels = class_of_channel[walked_scores.argmax(axis=0)].astype(np.uint8)
    save_png(out_dir / f"{image_id}.png", palette_image(labels))


def check_inputs(ctx: StageContext) -> None:
    rw_image_ids(ctx)
    ctx.validate_split(ctx.config.data.eval_split, need_masks=True)
    check_crf(ctx.config.make_rw.crf)
    if not final_model_path(ctx, "train_aff").exists() and "train_aff" not in ctx.requested_stages:
        raise FileNotFoundError(f"make_rw reads {final_model_path(ctx, 'train_aff')}: run train_aff first")


@register_stage(
    "make_rw",
    order=60,
    help="random walk with AffinityNet's affinities: pseudo masks (palette PNG) and their mIoU (+RW)",
    preflight=check_inputs,
)
def run(ctx: StageContext) -> None:
    config = ctx.config.make_rw
    out_dir = mask_directory(ctx)
    model_path = final_model_path(ctx, "train_aff")
    source = resolve_cam_source(ctx)
    cam_dir = cam_directory(ctx, source)
    image_ids = rw_image_ids(ctx)
    stat = model_path.stat()
    fingerprint: dict[str, Any] = {
        "model": str(model_path),
        "model_size": stat.st_size,
        "model_mtime_ns": stat.st_mtime_ns,
        "cams": cam_fingerprint(ctx),
        "beta": config.beta,
        "exponent": config.exponent,
        "background_power": config.background_power,
        "radius": config.radius,
        "crf": PSA_CRF.as_dict() if config.crf else None,
    }
    meta_path = ctx.workdir / "make_rw" / "meta.json"
    if ctx.dist.is_main:
        stale = meta_path.exists() and read_json(meta_path).get("fingerprint") != fingerprint
        if (stale or ctx.force) and out_dir.exists():
            shutil.rmtree(out_dir)
        write_json(meta_path, {"fingerprint": fingerprint, "complete": False})
    barrier()

    todo = [image_id for image_id in image_ids if not (out_dir / f"{image_id}.png").exists()]
    ctx.print(f"[make_rw] {len(image_ids) - len(todo)} of {len(image_ids)} pseudo masks done already")
    model = build_affinity_net(ctx.config.train_aff, "none")
    load_final_model(model_path, model)
    model.to(ctx.device).eval()
    shard = todo[ctx.dist.rank :: ctx.dist.world_size]
    with small_op_threads(ctx, ctx.config.train_aff.backbone == "tiny"):
        for image_id in tqdm(shard, desc="make_rw", disable=not ctx.dist.is_main, dynamic_ncols=True):
            write_pseudo_mask(ctx, model, cam_dir, out_dir, image_id)
    barrier()
    missing = broadcast_object(
        [i for i in image_ids if not (out_dir / f"{i}.png").exists()] if ctx.dist.is_main else None
    )
    if missing:
        raise RuntimeError(f"make_rw: {len(missing)} pseudo masks missing, e.g. {out_dir / missing[0]}.png")

    split = ctx.config.data.eval_split
    eval_ids = ctx.validate_split(split, need_masks=True)
    class_names = ("background", *ctx.source.class_names)
    iou = iou_from_confusion(segmentation_confusion(ctx, eval_ids, out_dir, len(class_names)))
    result = {
        "miou": round(100 * mean_iou(iou), 2),
        "per_class": per_class(class_names, iou),
        "split": split,
        "images": len(eval_ids),
        "cam_source": source,
        "beta": config.beta,
        "exponent": config.exponent,
        "steps": 2**config.exponent,
        "background_power": config.background_power,
        "radius": config.radius,
        "crf": config.crf,
        "crf_params": PSA_CRF.as_dict() if config.crf else None,
        "affinity_labels": {
            "powers": [ctx.config.train_aff.low_power, ctx.config.train_aff.high_power],
            "crf": ctx.config.train_aff.crf,
        },
        "units": "percent",
    }
    ctx.update_results({"rw": result})
    summary = (
        f"rw on {ctx.config.dataset} {split} ({len(eval_ids)} images): mIoU {result['miou']:.2f} with beta "
        f"{config.beta}, 2^{config.exponent} steps, background power {config.background_power}, "
        f"{'with' if config.crf else 'no'} CRF"
    )
    table = format_iou_table("Pseudo-mask mIoU: CAM + random walk", class_names, iou, summary)
    if ctx.dist.is_main:
        atomic_write(
            ctx.workdir / "make_rw" / "rw_table.md", lambda file: file.write((table + "\n").encode())
        )
        write_json(meta_path, {"fingerprint": fingerprint, "complete": True, "images": len(image_ids)})
    ctx.logger("make_rw").log("done", miou=result["miou"], images=len(image_ids), inferred=len(todo))
    ctx.print(table)
