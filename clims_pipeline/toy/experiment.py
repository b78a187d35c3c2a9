"""The CLIMS ablation on the toy world, in memory: baseline CAM, then CLIMS with losses added one by one.

The toy world's images are 64 x 64, so a whole split fits in memory as one tensor; training and evaluating
from tensors (instead of the pipeline's per-image files) is what makes fifteen trainings fit in minutes on
a CPU. The networks, the learning-rate schedule, the multi-scale CAM inference and the threshold sweep are
the pipeline's own (``networks``, ``training.ScheduledSteps``, ``cams.multiscale_cams``,
``metrics.ThresholdSweep``), so what is measured here is what the pipeline runs.

Protocol (see docs/toyworld.md):

* the baseline CAM network is trained on ``train_aug`` with image labels only (GAP + multilabel soft
  margin); every CLIMS row starts from it, as in the paper;
* a row is the CLIP evaluator with some loss weights set to 0 (``ABLATION_ROWS``);
* CAM quality is the mIoU on ``val`` (held out: never trained on, never tuned on) at the best background
  threshold of a sweep, as the paper's protocol does on its evaluation split; settings were tuned on the
  ``train`` split's masks;
* every row runs for each seed; mean and std over seeds are reported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clims_loss import IMAGENET_MEAN, IMAGENET_STD

from ..cams import multiscale_cams, normalise_by_max
from ..config import TrainConfig
from ..metrics import ThresholdSweep, iou_from_confusion, mean_iou
from ..networks import CAMNet, build_network
from ..training import RunningSums, ScheduledSteps, optimizer_with_head_group, plan_steps

#: The rows of the paper's Table 3 that this ablation reproduces, in the paper's order: name -> which of
#: the weights (otm, btm, cbs, reg) stay on. "baseline" is the CAM network without CLIP.
ABLATION_ROWS: dict[str, tuple[str, ...]] = {
    "otm": ("otm",),
    "otm_btm": ("otm", "btm"),
    "otm_btm_reg": ("otm", "btm", "reg"),
    "full": ("otm", "btm", "reg", "cbs"),
}
ROW_TITLES: dict[str, str] = {
    "baseline": "baseline CAM (no CLIP)",
    "otm": "L_OTM",
    "otm_btm": "+ L_BTM",
    "otm_btm_reg": "+ L_REG",
    "full": "+ L_CBS (full CLIMS)",
}
#: The paper's Table 3 (VOC train, CAM mIoU %): the same rows. The baseline is not in Table 3; the paper's
#: Table 1 compares against other methods, so the column is empty there.
PAPER_TABLE3: dict[str, float | None] = {
    "baseline": None,
    "otm": 37.2,
    "otm_btm": 41.3,
    "otm_btm_reg": 53.1,
    "full": 56.6,
}
#: The paper's Table 4 (VOC train, IoU %): boat and train without / with CBS (on top of OTM + BTM).
PAPER_TABLE4 = {"without_cbs": {"boat": 7.1, "train": 30.7}, "with_cbs": {"boat": 58.2, "train": 63.9}}
#: The classes whose IoU Table 4 reports; in the toy world every class has a co-occurring background, and
#: these two are the paper's examples (boat - water, train - railroad).
COOCCURRING_CLASSES: tuple[str, ...] = ("boat", "train")


def row_weights(row: str, weights: dict[str, float]) -> dict[str, float]:
    """The full model's weights with the losses that ``row`` leaves out set to 0."""
    if row not in ABLATION_ROWS:
        raise ValueError(f"expected an ablation row from {list(ABLATION_ROWS)}, got {row!r}")
    return {name: (value if name in ABLATION_ROWS[row] else 0.0) for name, value in weights.items()}


# ----------------------------------------------------------------------------------------------------
# Data in memory
# ----------------------------------------------------------------------------------------------------


@dataclass
class SplitTensors:
    """A split of a VOC-layout data set as tensors: ImageNet-normalised images (N, 3, H, W) float32, masks
    (N, H, W) int64 (0 background, 1..K, 255 void), multi-hot labels (N, K) float32, and the raw uint8
    images (N, H, W, 3) for pictures."""

    ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    raw: np.ndarray


def load_split(root: str | Path, split: str, num_classes: int, limit: int | None = None) -> SplitTensors:
    """Read a split's images, masks and labels (from ``cls_labels.json``); all images must share one size."""
    root = Path(root)
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    if limit is not None:
        ids = ids[:limit]
    if not ids:
        raise ValueError(f"split {split!r} of {root} is empty")
    all_labels = json.loads((root / "cls_labels.json").read_text())
    raw = np.stack([np.asarray(Image.open(_image_file(root, i)).convert("RGB")) for i in ids])
    masks = np.stack([np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids])
    labels = torch.zeros(len(ids), num_classes)
    for row, image_id in enumerate(ids):
        for label in all_labels[image_id]:
            labels[row, label - 1] = 1.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    return SplitTensors(ids, images.contiguous(), torch.from_numpy(masks.astype(np.int64)), labels, raw)


def _image_file(root: Path, image_id: str) -> Path:
    for ext in (".jpg", ".png"):
        path = root / "JPEGImages" / f"{image_id}{ext}"
        if path.exists():
            return path
    raise FileNotFoundError(f"no image for id {image_id!r} under {root / 'JPEGImages'}")


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (the toy world's captions and masks do not depend on left and right)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

#: loss(model, images, labels) -> (loss, {name: value} for logging)
BatchLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def train_in_memory(
    model: CAMNet,
    data: SplitTensors,
    config: TrainConfig,
    loss_fn: BatchLoss,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train over ``data`` as the pipeline's ``train_network`` does it (10x head, per-step poly/cosine lr),
    from tensors; returns the last logged averages."""
    steps_per_epoch, total_steps = plan_steps(len(data.ids), config)
    optimizer, base_lrs = optimizer_with_head_group(model, config)
    schedule = ScheduledSteps(optimizer, base_lrs, config, total_steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    running = RunningSums(config.log_every)
    last: dict[str, float] = {}
    while step < total_steps:
        order = torch.randperm(len(data.ids), generator=generator)
        for start in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            if step >= total_steps:
                break
            index = order[start : start + config.batch_size]

            def compute_loss(index: torch.Tensor = index) -> tuple[torch.Tensor, dict[str, float]]:
                return loss_fn(model, augment_batch(data.images[index], generator), data.labels[index])

            loss, parts = schedule.step(step, compute_loss)
            step += 1
            running.add({"loss": loss, **parts})
            count = running.due(step, total_steps)
            if count:
                last = {key: value / count for key, value in running.take().items()}
                if log is not None:
                    log(f"step {step}/{total_steps} " + " ".join(f"{k} {v:.4f}" for k, v in last.items()))
    model.eval()
    return last


def baseline_loss(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    return F.multilabel_soft_margin_loss(model(images), labels), {}


def clims_batch_loss(evaluator: Any) -> BatchLoss:
    def loss_fn(
        model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = evaluator(images, model(images), labels)
        parts = {name: float(getattr(out, name).detach()) for name in ("otm", "btm", "cbs", "reg")}
        parts["sim_fg"] = float(out.sim_fg_text.detach().mean()) if out.sim_fg_text.numel() else 0.0
        return out.loss, parts

    return loss_fn


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def infer_cams(
    model: CAMNet, data: SplitTensors, scales: Sequence[float], flip: bool, batch_size: int = 100
) -> torch.Tensor:
    """Max-normalised full-resolution CAMs of every class (N, K, H, W), zero for absent classes."""
    model.eval()
    chunks = []
    for start in range(0, len(data.ids), batch_size):
        images = data.images[start : start + batch_size]
        _, high = multiscale_cams(model, images, tuple(scales), flip, 4, False)
        labels = data.labels[start : start + batch_size]
        batch, classes, height, width = high.shape
        normalised = normalise_by_max(high.reshape(batch * classes, height, width)).view_as(high)
        chunks.append(normalised * labels.view(batch, classes, 1, 1))
    return torch.cat(chunks)


def cam_prediction(cams: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(arg-max class in 1..K, its score) per pixel of (N, K, H, W) label-masked CAMs."""
    score, winner = cams.max(dim=1)
    return (winner + 1).numpy(), score.numpy()


def evaluate_cams(
    cams: torch.Tensor, data: SplitTensors, class_names: Sequence[str], thresholds: np.ndarray
) -> dict[str, Any]:
    """mIoU at the best background threshold, per-class IoU there and the whole curve (in %).

    Also each class's precision (the share of its predicted pixels that are the class) and recall there:
    a map that covers the object's co-occurring background has low precision, a map too small low recall.
    """
    labels = ("background", *class_names)
    sweep = ThresholdSweep(len(labels), thresholds)
    predicted, score = cam_prediction(cams)
    sweep.add(data.masks.numpy(), predicted, score)
    curve = sweep.miou_per_threshold()
    best = int(np.nanargmax(curve))
    confusion = sweep.confusion_at(best).astype(np.float64)
    iou = iou_from_confusion(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.diag(confusion) / confusion.sum(axis=0)
        recall = np.diag(confusion) / confusion.sum(axis=1)
    return {
        "miou": 100 * mean_iou(iou),
        "threshold": float(thresholds[best]),
        "per_class": {name: 100 * float(value) for name, value in zip(labels, iou, strict=True)},
        "precision": {name: 100 * float(v) for name, v in zip(labels, np.nan_to_num(precision), strict=True)},
        "recall": {name: 100 * float(v) for name, v in zip(labels, np.nan_to_num(recall), strict=True)},
        "curve": {f"{t:.2f}": 100 * float(m) for t, m in zip(thresholds, curve, strict=True)},
    }


def default_thresholds() -> np.ndarray:
    return np.round(np.arange(0.05, 0.951, 0.025), 4)


# ----------------------------------------------------------------------------------------------------
# The whole ablation
# ----------------------------------------------------------------------------------------------------


def _toy_preset() -> Any:
    from ..config import build_config

    return build_config("toy", "paper", "toy")


@dataclass
class AblationSettings:
    """Everything a run of the ablation depends on. The defaults are the ``toy`` preset's
    (``presets.apply_toy_preset``), so the ablation measures what the pipeline runs."""

    backbone: str = dataclasses.field(default_factory=lambda: str(_toy_preset().network.backbone))
    cam_train: TrainConfig = dataclasses.field(default_factory=lambda: _toy_preset().train_cam)
    clims_train: TrainConfig = dataclasses.field(default_factory=lambda: _toy_preset().train_clims.train)
    weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict(_toy_preset().train_clims.loss_weights)
    )
    similarity: str = "clamp"
    cbs_reduction: str = "mean"
    train_split: str = "train_aug"
    train_limit: int | None = None
    eval_split: str = "val"
    eval_limit: int | None = None
    scales: tuple[float, ...] = dataclasses.field(
        default_factory=lambda: tuple(_toy_preset().make_cam.scales)
    )
    flip: bool = dataclasses.field(default_factory=lambda: bool(_toy_preset().make_cam.flip))
    rows: tuple[str, ...] = ("baseline", *ABLATION_ROWS)
    # Class -> CBS background terms in place of the hand-written toy ones (e.g. a mined registry's).
    class_backgrounds: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def toy_registry(
    similarity: str = "clamp",
    cbs_reduction: str = "mean",
    class_backgrounds: dict[str, list[str]] | None = None,
) -> Any:
    """The toy world's prompts (``world.toy_prompts``) as a registry.

    CBS is averaged over the positive pairs like OTM and BTM (the library's default sums it, as the
    camera-ready code does): summed over the ~25 pairs of a batch of 16 it outweighed every other term
    about 25 to 1 and the maps collapsed (measured: all maps at 0.5, CAM mIoU below the baseline)."""
    import clims_loss as cl

    from .world import toy_prompts

    registry = cl.BackgroundPromptRegistry(**toy_prompts()).replace(
        similarity=similarity, cbs_reduction=cbs_reduction
    )
    if class_backgrounds is not None:
        registry = registry.replace(class_backgrounds=class_backgrounds)
    return registry


def build_toy_evaluator(
    clip_name: str,
    clip_checkpoint: str | Path,
    weights: dict[str, float],
    similarity: str = "clamp",
    cbs_reduction: str = "mean",
    class_backgrounds: dict[str, list[str]] | None = None,
) -> Any:
    import clims_loss as cl

    from .clip import register_toy_clip_config

    register_toy_clip_config()
    prompts = toy_registry(similarity, cbs_reduction, class_backgrounds)
    return cl.CLIPTextDrivenEvaluator.from_pretrained(
        clip_name,
        pretrained=str(clip_checkpoint),
        prompts=prompts,
        weights=cl.LossWeights(**weights),
        image_mean=cl.IMAGENET_MEAN,  # how load_split normalises
        image_std=cl.IMAGENET_STD,
    )


def run_ablation(
    world_root: str | Path,
    clip_checkpoint: str | Path,
    seeds: Sequence[int],
    settings: AblationSettings,
    clip_name: str,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every row for every seed; return per-seed results and the CAMs of seed 0.

    ``verbose`` also logs the training losses every ``log_every`` steps."""
    step_log = log if verbose else None
    from .world import TOY_CLASSES

    class_names = TOY_CLASSES
    train = load_split(world_root, settings.train_split, len(class_names), settings.train_limit)
    evaluation = load_split(world_root, settings.eval_split, len(class_names), settings.eval_limit)
    thresholds = default_thresholds()
    evaluators = {
        row: build_toy_evaluator(
            clip_name,
            clip_checkpoint,
            row_weights(row, settings.weights),
            settings.similarity,
            settings.cbs_reduction,
            settings.class_backgrounds,
        )
        for row in settings.rows
        if row != "baseline"
    }
    per_seed: dict[str, list[dict[str, Any]]] = {row: [] for row in settings.rows}
    first_seed_cams: dict[str, torch.Tensor] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        baseline = build_network("cam", settings.backbone, "none", len(class_names))
        started = time.perf_counter()
        train_in_memory(baseline, train, settings.cam_train, baseline_loss, seed, step_log)
        baseline_state = {k: v.clone() for k, v in baseline.state_dict().items()}
        for row in settings.rows:
            row_started = time.perf_counter()
            if row == "baseline":
                model: CAMNet = baseline
            else:
                model = build_network("clims", settings.backbone, "none", len(class_names))
                model.load_state_dict(baseline_state)
                started = time.perf_counter()
                train_in_memory(
                    model,
                    train,
                    settings.clims_train,
                    clims_batch_loss(evaluators[row]),
                    seed + 1000,
                    step_log,
                )
            cams = infer_cams(model, evaluation, settings.scales, settings.flip)
            result = evaluate_cams(cams, evaluation, class_names, thresholds)
            result["seconds"] = round(time.perf_counter() - started, 1)
            per_seed[row].append(result)
            if seed == seeds[0]:
                first_seed_cams[row] = cams
            log(
                f"[ablation] seed {seed} {row:12s} mIoU {result['miou']:.1f} at threshold "
                f"{result['threshold']:.3f} ({time.perf_counter() - row_started:.0f} s) | "
                + " ".join(f"{c} {result['per_class'][c]:.0f}" for c in class_names)
            )
    return {"per_seed": per_seed, "cams": first_seed_cams, "evaluation": evaluation, "seeds": list(seeds)}


def summarise(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The JSON of the issue: rows (mean/std of mIoU over seeds) and the co-occurring classes' IoU."""
    rows: dict[str, dict[str, Any]] = {}
    for row, results in per_seed.items():
        values = np.array([r["miou"] for r in results])
        rows[row] = {
            "miou_mean": round(float(values.mean()), 2),
            "miou_std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 2),
            "miou_per_seed": [round(float(v), 2) for v in values],
            "threshold_per_seed": [r["threshold"] for r in results],
            **{
                f"{key}_mean": {
                    name: round(float(np.mean([r[key][name] for r in results])), 2)
                    for name in results[0][key]
                }
                for key in ("per_class", "precision", "recall")
            },
        }
    summary: dict[str, Any] = {"rows": rows}
    if "otm_btm_reg" in per_seed and "full" in per_seed:

        def cooccurring(row: str, key: str = "per_class") -> float:
            return float(np.mean([rows[row][f"{key}_mean"][name] for name in COOCCURRING_CLASSES]))

        summary["cooccurring_iou"] = {
            "without_cbs": round(cooccurring("otm_btm_reg"), 2),
            "with_cbs": round(cooccurring("full"), 2),
            # Where the maps went: precision falls when they cover the co-occurring background.
            **{
                f"{key}_{side}": round(cooccurring(row, key), 2)
                for key in ("precision", "recall")
                for side, row in (("without_cbs", "otm_btm_reg"), ("with_cbs", "full"))
            },
            "classes": list(COOCCURRING_CLASSES),
            "per_class": {
                name: {
                    "without_cbs": rows["otm_btm_reg"]["per_class_mean"][name],
                    "with_cbs": rows["full"]["per_class_mean"][name],
                }
                for name in COOCCURRING_CLASSES
            },
            "compared_rows": ["otm_btm_reg", "full"],
        }
    return summary


def format_table(summary: dict[str, Any], seeds: int) -> str:
    """Markdown: the ablation beside the paper's Table 3, then the Table 4 analogue."""
    lines = [
        f"| losses | toy world CAM mIoU (%), mean ± std over {seeds} seeds | paper Table 3 (VOC train) |",
        "| --- | ---: | ---: |",
    ]
    for row, values in summary["rows"].items():
        paper = PAPER_TABLE3.get(row)
        lines.append(
            f"| {ROW_TITLES[row]} | {values['miou_mean']:.1f} ± {values['miou_std']:.1f} | "
            f"{'–' if paper is None else f'{paper:.1f}'} |"
        )
    if "cooccurring_iou" in summary:
        co = summary["cooccurring_iou"]
        lines += [
            "",
            "| IoU (%) | " + " | ".join(co["classes"]) + " | mean | paper Table 4 mean (boat, train) |",
            "| --- | " + " | ".join("---:" for _ in co["classes"]) + " | ---: | ---: |",
        ]
        for key, title in (("without_cbs", "without L_CBS"), ("with_cbs", "with L_CBS")):
            paper_ious = PAPER_TABLE4[key]
            lines.append(
                f"| {title} | "
                + " | ".join(f"{co['per_class'][c][key]:.1f}" for c in co["classes"])
                + f" | {co[key]:.1f} | {math.fsum(paper_ious.values()) / len(paper_ious):.1f} |"
            )
        names = ", ".join(co["classes"])
        lines += ["", f"| {names} maps (mean) | precision (%) | recall (%) |", "| --- | ---: | ---: |"]
        for key, title in (("without_cbs", "without L_CBS"), ("with_cbs", "with L_CBS")):
            lines.append(f"| {title} | {co['precision_' + key]:.1f} | {co['recall_' + key]:.1f} |")
    return "\n".join(lines)
