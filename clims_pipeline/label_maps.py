"""Label maps as palette PNGs (affinity labels, pseudo masks, predictions) and their mIoU, and what the two
CAM refiners' stages share (PSA: ``train_aff``, ``make_rw``; IRNet: ``train_irn``, ``make_sem_seg``).

The PNGs hold class indices (0 background, 1..K, 255 ignore) with the VOC colours as palette, so they open as
pictures and read back as the indices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .cams import cam_digest, cam_directory, load_cam_file
from .config import PipelineConfig, TrainConfig
from .context import Stage, StageContext
from .data import VOID_LABEL, DatasetError, normalize_image, random_crop_with_padding
from .distributed import all_reduce_sum
from .files import atomic_write, save_png
from .metrics import confusion_matrix, format_iou_table, iou_from_confusion, mean_iou
from .runstate import StageOutput, output_digest, verify_file
from .training import TrainerStage, small_op_threads
from .visualize import label_palette


def palette_image(labels: np.ndarray) -> Image.Image:
    """(H, W) uint8 labels -> a palette PNG image with the VOC colours (values stay the class indices)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(label_palette().flatten().tolist())
    return image


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG, after checking its size and sha256 against those its stage's manifest recorded (a
    mismatch raises :class:`~clims_pipeline.files.DamagedFileError` naming the file and the stage)."""
    verify_file(path)
    with Image.open(path) as image:
        return np.array(image, dtype=np.uint8)


def pseudo_mask_directory(ctx: StageContext) -> Path:
    """Where ``make_rw`` writes PSA's pseudo masks (``train_seg``'s with ``refine.method=psa``)."""
    return ctx.workdir / "make_rw" / "masks"


def sem_seg_mask_directory(ctx: StageContext) -> Path:
    """Where ``make_sem_seg`` writes IRNet's pseudo masks (``train_seg``'s with ``refine.method=irn``)."""
    return ctx.workdir / "make_sem_seg" / "masks"


#: The stage that writes each refiner's pseudo masks (``refine.method``).
REFINER_STAGES = {"psa": "make_rw", "irn": "make_sem_seg"}


def refiner_stage(method: str) -> str:
    """The stage whose pseudo masks ``refine.method`` names (a ValueError names the known methods)."""
    if method not in REFINER_STAGES:
        raise ValueError(f"expected refine.method one of {sorted(REFINER_STAGES)}, got {method!r}")
    return REFINER_STAGES[method]


def training_mask_stage(ctx: StageContext) -> str | None:
    """The stage whose pseudo masks train_seg trains on (None: the ground truth)."""
    source = ctx.config.train_seg.mask_source
    if source == "refined":
        return refiner_stage(ctx.config.refine.method)
    if source in REFINER_STAGES.values():
        return source
    if source == "ground_truth":
        return None
    raise ValueError(
        "expected train_seg.mask_source 'refined', 'make_rw', 'make_sem_seg' or 'ground_truth', got "
        f"{source!r}"
    )


def crop_image_and_labels(
    image: Image.Image, labels: np.ndarray, crop_size: int, rng: np.random.Generator, ignore: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """One random crop of the normalised image (pad 0) and its labels (pad ``ignore``)."""
    stacked = np.concatenate([normalize_image(image), labels[None].astype(np.float32) + 1.0])
    crop = random_crop_with_padding(stacked, crop_size, rng)
    cropped_labels = crop[3]  # 0 only where the crop was padded
    out_labels = np.where(cropped_labels == 0, ignore, cropped_labels - 1).astype(np.int64)
    return np.ascontiguousarray(crop[:3]), out_labels


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
    summed: np.ndarray = all_reduce_sum(torch.from_numpy(confusion)).numpy()
    return summed


def per_class(class_names: tuple[str, ...], iou: np.ndarray) -> dict[str, float | None]:
    """IoU per class in percent (None for a class absent from both ground truth and prediction)."""
    return {
        name: (None if np.isnan(value) else round(100 * float(value), 2))
        for name, value in zip(class_names, iou, strict=True)
    }


#: make_labels(image id, image (H, W, 3) uint8, CAM file dict) -> (H, W) uint8 labels (255 ignored)
CamLabeller = Callable[[str, np.ndarray, dict[str, np.ndarray]], np.ndarray]


def write_cam_label_maps(
    ctx: StageContext,
    stage: str,
    directory: Path,
    settings: dict[str, Any],
    image_ids: list[str],
    make_labels: CamLabeller,
    what: str,
) -> None:
    """Label maps made from each image and its CAMs (``train_aff``'s affinity labels, ``train_irn``'s
    relation labels), as palette PNGs in ``directory``: an output of its own (fingerprint: the CAMs and
    ``settings``), resumable, sharded over the ranks, kept while current."""
    output = ctx.output(stage, directory, {"cams": cam_digest(ctx), **settings})
    if output.is_current():
        return
    output.begin()
    cam_dir = cam_directory(ctx)

    def path_of(image_id: str) -> Path:
        return output.directory / f"{image_id}.png"

    shard = output.share(output.todo(image_ids, path_of, what))
    for image_id in tqdm(shard, desc=what, disable=not ctx.dist.is_main, dynamic_ncols=True):
        image = np.asarray(ctx.source.load_image(image_id))
        labels = make_labels(image_id, image, load_cam_file(cam_dir / f"{image_id}.npy"))
        save_png(path_of(image_id), palette_image(labels))
    output.finish_files(image_ids, path_of)


def write_pseudo_masks(
    ctx: StageContext,
    output: StageOutput,
    image_ids: list[str],
    stage: str,
    tiny_network: bool,
    write_one: Callable[[str], None],
) -> int:
    """A refiner's pseudo masks (``make_rw``, ``make_sem_seg``): ``write_one(image_id)`` writes
    ``<output>/<id>.png`` for every image not done already, sharded over the ranks, and the manifest records
    every file. Returns how many images were inferred in this run."""
    output.begin()

    def path_of(image_id: str) -> Path:
        return output.directory / f"{image_id}.png"

    todo = output.todo(image_ids, path_of, "pseudo masks")
    with small_op_threads(ctx, tiny_network):
        for image_id in tqdm(
            output.share(todo), desc=stage, disable=not ctx.dist.is_main, dynamic_ncols=True
        ):
            write_one(image_id)
    output.finish_files(image_ids, path_of)
    return len(todo)


def evaluate_pseudo_masks(
    ctx: StageContext,
    stage: str,
    mask_dir: Path,
    key: str,
    settings: dict[str, Any],
    title: str,
    described: str,
) -> dict[str, Any]:
    """The mIoU of a refiner's pseudo masks on the evaluation split: ``results.json`` under ``key`` (with
    ``settings``), the per-class table printed and written to ``<workdir>/<stage>/<key>_table.md``."""
    split = ctx.config.data.eval_split
    eval_ids = ctx.validate_split(split, need_masks=True)
    class_names = ("background", *ctx.source.class_names)
    iou = iou_from_confusion(segmentation_confusion(ctx, eval_ids, mask_dir, len(class_names)))
    result = {
        "miou": round(100 * mean_iou(iou), 2),
        "per_class": per_class(class_names, iou),
        "split": split,
        "images": len(eval_ids),
        **settings,
        "units": "percent",
    }
    ctx.update_results({key: result}, stage=stage)
    summary = (
        f"{key} on {ctx.config.dataset} {split} ({len(eval_ids)} images): mIoU {result['miou']:.2f} with "
        f"{described}"
    )
    table = format_iou_table(title, class_names, iou, summary)
    if ctx.dist.is_main:
        atomic_write(
            ctx.workdir / stage / f"{key}_table.md", lambda file: file.write((table + "\n").encode())
        )
    ctx.print(table)
    return result


def refinement_image_ids(ctx: StageContext) -> list[str]:
    """The images a refiner makes pseudo masks of: the training split, then the evaluation split's others."""
    ids: dict[str, None] = {}
    for split in dict.fromkeys([ctx.config.data.train_split, ctx.config.data.eval_split]):
        ids.update(dict.fromkeys(ctx.validate_split(split, need_labels=True)))
    return list(ids)


class PseudoMaskStage(Stage):
    """A refiner's inference stage (``make_rw`` for PSA, ``make_sem_seg`` for IRNet): pseudo masks of
    :func:`refinement_image_ids` in ``<workdir>/<name>/masks/`` and their mIoU on the evaluation split;
    ``--stages all`` runs it when ``refine.method`` is its ``method`` or ``refine.compare`` is set."""

    method: ClassVar[str]

    def in_all(self, config: PipelineConfig) -> bool:
        return config.refine.method == self.method or config.refine.compare

    def check(self, ctx: StageContext) -> None:
        refinement_image_ids(ctx)
        ctx.validate_split(ctx.config.data.eval_split, need_masks=True)

    def output_directory(self, ctx: StageContext) -> Path:
        return ctx.workdir / self.name / "masks"


class RefinerTrainerStage(TrainerStage):
    """The trainer of a CAM refiner (``train_aff`` for PSA, ``train_irn`` for IRNet): label maps made from
    the CAMs of the training split (``<workdir>/<name>/labels/``, an output of their own), then a network
    trained on them. Its settings are the config section named like the stage (with ``train`` and ``crf``
    fields); ``--stages all`` runs it when ``refine.method`` is its ``method`` or ``refine.compare`` is set.
    Subclasses supply ``label_settings`` (what the labels depend on besides the CAMs) and ``labeller``."""

    method: ClassVar[str]
    labels_what: ClassVar[str]
    #: The training crops: called as ``(source, image_ids, label_directory, settings, seed)``.
    crop_dataset: ClassVar[Callable[..., Dataset[dict[str, Any]]]]
    reads = ("make_cam",)

    def in_all(self, config: PipelineConfig) -> bool:
        return config.refine.method == self.method or config.refine.compare

    def settings(self, ctx: StageContext) -> Any:
        return getattr(ctx.config, self.name)

    def training_ids(self, ctx: StageContext) -> list[str]:
        return ctx.validate_split(ctx.config.data.train_split, need_labels=True)

    def check(self, ctx: StageContext) -> None:
        self.training_ids(ctx)

    def uses_crf(self, ctx: StageContext) -> bool:
        return bool(self.settings(ctx).crf)

    def train_config(self, ctx: StageContext) -> TrainConfig:
        config: TrainConfig = self.settings(ctx).train
        return config

    def label_directory(self, ctx: StageContext) -> Path:
        return ctx.workdir / self.name / "labels"

    def label_settings(self, ctx: StageContext) -> dict[str, Any]:
        raise NotImplementedError

    def labeller(self, ctx: StageContext) -> CamLabeller:
        raise NotImplementedError

    def build_dataset(self, ctx: StageContext) -> Dataset[dict[str, Any]]:
        return self.crop_dataset(
            ctx.source, self.training_ids(ctx), self.label_directory(ctx), self.settings(ctx), ctx.seed
        )

    def labels_digest(self, ctx: StageContext) -> str:
        """Make (or reuse) the label maps; the digest of their output, for the trainer's fingerprint."""
        directory = self.label_directory(ctx)
        write_cam_label_maps(
            ctx, self.name, directory, self.label_settings(ctx), self.training_ids(ctx), self.labeller(ctx),
            self.labels_what,
        )  # fmt: skip
        return output_digest(directory, self.name)
