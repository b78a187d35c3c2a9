"""Every hyper-parameter of the pipeline, in one place.

A run's configuration is ``build_config(preset, variant, dataset)`` plus ``--set section.field=value``
overrides.

* ``preset``: ``full`` (the sizes of the paper: ResNet-50, crop 512, batch 16, ...) or ``smoke`` (a tiny
  backbone, tiny crops and a tiny random CLIP, so that all stages finish in minutes on a CPU).
* ``variant``: which CLIMS recipe ``train_clims`` follows. ``paper`` is the camera-ready paper (loss weights
  10/25/29.5/1.15, class-specific backgrounds, 10 epochs, cosine lr); ``official`` is the improved recipe of
  the
  authors' repository root (10/24/1/0.2, a global background list with a hinged CBS, 15 epochs, poly lr).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

PRESETS = ("full", "smoke", "toy")
VARIANTS = ("paper", "official")
DATASETS = ("voc", "coco", "toy")

#: The background-prompt preset of ``clims_loss.BackgroundPromptRegistry`` used by each (dataset, variant).
PROMPT_PRESETS = {
    ("voc", "paper"): "voc",
    ("voc", "official"): "voc-official",
    ("coco", "paper"): "coco",
    ("coco", "official"): "coco",
    # The toy world's registry is built from clims_pipeline.toy.world.toy_prompts(), not a library preset.
    ("toy", "paper"): "toy",
    ("toy", "official"): "toy",
}


@dataclass
class DataConfig:
    train_split: str = "train_aug"
    eval_split: str = "train"
    resize_long: tuple[int, int] = (320, 640)  # random rescale: the long side is drawn from this range
    crop_size: int = 512
    num_workers: int = 4


@dataclass
class NetworkConfig:
    backbone: str = "resnet50"  # "resnet50" (the paper's) or "tiny" (tests and smoke runs)
    weights: str = "imagenet"  # "imagenet" (torchvision), "none" (random init) or a path to a state dict


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 16  # the global batch: split evenly over the torchrun processes
    lr: float = 0.1
    head_lr_mult: float = 10.0  # the freshly initialised 1x1 classifier learns 10x faster
    weight_decay: float = 1e-4
    # The reference trainers (IRN, CLIMS) build SGD as SGD(params, lr, weight_decay), which puts the weight
    # decay
    # in SGD's positional *momentum* slot (the decay itself is set per parameter group). Their effective
    # momentum is therefore 1e-4; we keep that so the schedules match.
    momentum: float = 1e-4
    # "sgd" (the reference trainers') or "adamw" (the toy preset's CAM net, trained from scratch: see
    # docs/toyworld.md); AdamW ignores ``momentum`` and decouples ``weight_decay``.
    optimizer: str = "sgd"
    schedule: str = "poly"  # "poly" (power 0.9, per step) or "cosine" (per step, to 0)
    poly_power: float = 0.9
    max_steps: int | None = None  # stop early after this many optimisation steps (tests); None = all epochs
    log_every: int = 20


@dataclass
class ClimsConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=2.5e-4))
    prompts: str = "voc"
    loss_weights: dict[str, float] | None = None  # None: the prompt preset's own weights (otm, btm, cbs, reg)
    clip: str = "ViT-B-32"
    clip_pretrained: str = "openai"  # an open_clip tag, a local checkpoint file, or "none" (random init)
    # Background prompts: "preset" (the variant's), "mined" (stage mine_backgrounds' file) or a registry JSON.
    backgrounds: str = "preset"


@dataclass
class MineBackgroundsConfig:
    """Stage ``mine_backgrounds``: each class's co-occurring backgrounds, ranked by CLIP (docs/mining.md)."""

    top_l: int = 3  # at most this many terms per class
    margin: float = 0.0  # a term's score must exceed this
    vocabulary: str = ""  # a text file with one term per line; "" = clims_loss.DEFAULT_BACKGROUND_VOCABULARY
    max_objectness: float = 2.0  # terms this many std. dev. closer to the class's text are synonyms
    objectness_penalty: float = 0.02
    batch_size: int = 64  # images per CLIP forward
    max_images: int | None = None  # a seeded random subset of the training split; None = all of it


@dataclass
class ClipTrainConfig:
    """Stage ``train_clip``: CLIP trained (toy world, from scratch) or fine-tuned (real data) on captions.

    ``captions="toy"`` reads the toy world's captions; ``"labels"`` makes the paper's label captions
    ("a photo of boat and person.") from the training split's image labels.
    """

    enabled: bool = False  # off: train_clims uses train_clims.clip_pretrained as given
    model: str = "ViT-B-32"
    pretrained: str = "openai"  # start from this open_clip tag or file; "none" = from scratch
    captions: str = "labels"
    caption_splits: tuple[str, ...] = ("train_aug",)  # toy: + the background-only images
    # The paper's fine-tuning (Sec. 4.1): 20 epochs, lr 5e-5, weight decay 0.003.
    epochs: int = 20
    lr: float = 5e-5
    weight_decay: float = 0.003
    batch_size: int = 128
    max_steps: int | None = None
    # Toy captions only: "captions" (the world's captions), "web" (+ cut-out objects and object-free
    # pictures, pixel-space masks on those only) or "web_dark" (+ darkened scene copies captioned as dark,
    # masks on the cut-outs only); see clip_training.TOY_CLIP_CORPORA.
    toy_corpus: str = "captions"
    fixed_logit_scale: float | None = None  # e.g. 100: CLIP's final temperature, not learned


@dataclass
class ToyWorldConfig:
    """The toy world that ``--dataset toy`` generates into ``<workdir>/toyworld`` (without --voc-root)."""

    n_train: int = 4000
    n_val: int = 500
    seed: int = 0
    context_rate: float = 0.9  # how often an object stands on its own background


@dataclass
class MakeCamConfig:
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    batch_size: int = 8  # images of the same size are inferred together
    low_res_stride: int = 4  # the low-resolution map is 1/4 of the image (what PSA / IRN consume)
    splits: tuple[str, ...] = ()  # extra splits to infer; the train and evaluation splits are always included
    source: str = "auto"  # "auto" (train_clims when present, else train_cam), "train_clims" or "train_cam"


@dataclass
class EvalCamConfig:
    threshold_min: float = 0.01
    threshold_max: float = 0.95
    threshold_step: float = 0.01
    reference_threshold: float = 0.15  # the official repository's fixed background threshold, reported too
    overlays: int = 16


@dataclass
class TrainAffConfig:
    """PSA's AffinityNet (stage ``train_aff``): labels from the CAMs, then training on them."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=8, batch_size=8, lr=0.1, weight_decay=5e-4, momentum=5e-4, log_every=50
        )
    )  # PSA: 8 epochs, batch 8, lr 0.1 (10x head), weight decay 5e-4, poly; its SGD also has momentum = wd
    backbone: str = "resnet50"  # "resnet50" (dilated to output stride 8) or "tiny"
    weights: str = "imagenet"  # "imagenet" (torchvision), "none" or a local ResNet-50 state dict
    crop_size: int = 448
    resize_long: tuple[int, int] = (448, 768)
    color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)  # brightness, contrast, sat., hue
    radius: int = 5  # pairs within this distance on the stride-8 grid
    low_power: float = 4.0  # background power for the confident foreground
    high_power: float = 32.0  # background power for the confident background
    crf: bool = True  # refine both score maps with the dense CRF (PSA); False: plain arg-max


@dataclass
class MakeRWConfig:
    """Random walk (stage ``make_rw``): CAMs propagated with AffinityNet's transition matrix."""

    beta: float = 10.0  # A = affinity^beta (PSA: 8; CLIMS camera-ready: 10)
    exponent: int = 8  # 2^exponent walk steps (PSA "logt" 8; CLIMS "exp_times" 8)
    background_power: float = 16.0  # background score (1 - max CAM)^power before the walk (PSA: 16)
    radius: int = 5
    crf: bool = True  # dense CRF on the walked scores (CLIMS camera-ready: "+RW" is evaluated with crf=1)


@dataclass
class TrainSegConfig:
    """DeepLabV2 (stage ``train_seg``), deeplab-pytorch's VOC configuration as used by CLIMS."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=1000,
            batch_size=10,
            lr=2.5e-4,
            weight_decay=5e-4,
            momentum=0.9,
            max_steps=30000,
            log_every=100,
        )
    )  # 30k iterations of batch 10 (max_steps bounds the run; epochs is only an upper bound), poly 0.9
    backbone: str = "resnet101"  # "resnet101", "tiny" or "toy"
    weights: str = (
        "imagenet"  # "imagenet" (torchvision), "none", or a local ResNet-101 / DeepLabV2 state dict
    )
    crop_size: int = 321
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)  # random rescaling of training images
    msc_scales: tuple[float, ...] = (0.5, 0.75)  # the extra input scales of the MSC wrapper
    mask_source: str = "make_rw"  # "make_rw" (pseudo masks) or "ground_truth" (an upper-bound check)


@dataclass
class EvalSegConfig:
    split: str = "val"
    test_split: str = "test"  # written in the VOC submission layout when its list exists; "" to skip
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    flip: bool = True
    crf: bool = True  # dense CRF post-processing (needs the crf extra); results record both when enabled


@dataclass
class PipelineConfig:
    preset: str
    variant: str
    dataset: str
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train_cam: TrainConfig = field(default_factory=TrainConfig)
    train_clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    toy_world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    mine_backgrounds: MineBackgroundsConfig = field(default_factory=MineBackgroundsConfig)
    train_clims: ClimsConfig = field(default_factory=ClimsConfig)
    make_cam: MakeCamConfig = field(default_factory=MakeCamConfig)
    eval_cam: EvalCamConfig = field(default_factory=EvalCamConfig)
    train_aff: TrainAffConfig = field(default_factory=TrainAffConfig)
    make_rw: MakeRWConfig = field(default_factory=MakeRWConfig)
    train_seg: TrainSegConfig = field(default_factory=TrainSegConfig)
    eval_seg: EvalSegConfig = field(default_factory=EvalSegConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# : A tiny open_clip ViT shipped with the examples (``configs/<name>.json``): random init, for tests and smoke
# runs.
TINY_CLIP_NAME = "clims-pipeline-tiny-vit"


def build_config(preset: str = "full", variant: str = "paper", dataset: str = "voc") -> PipelineConfig:
    for value, allowed, what in (
        (preset, PRESETS, "preset"),
        (variant, VARIANTS, "variant"),
        (dataset, DATASETS, "dataset"),
    ):
        if value not in allowed:
            raise ValueError(f"expected --{what} to be one of {allowed}, got {value!r}")
    config = PipelineConfig(preset=preset, variant=variant, dataset=dataset)
    config.train_clims.prompts = PROMPT_PRESETS[(dataset, variant)]
    if variant == "paper":
        # Paper, Sec. 4.1: "The cosine annealing policy is applied ... trained for 10 epochs".
        config.train_clims.train = TrainConfig(epochs=10, lr=2.5e-4, schedule="cosine")
    else:
        # Official repository: 15 epochs of poly lr from a baseline CAM net, threshold 0.15 for evaluation.
        config.train_clims.train = TrainConfig(epochs=15, lr=2.5e-4, schedule="poly")
    if dataset == "coco":
        config.data.train_split = "train"
        config.data.eval_split = "val"
    if preset == "toy" or dataset == "toy":
        if (preset, dataset) != ("toy", "toy"):
            raise ValueError(
                f"the toy preset and the toy dataset go together, got --preset {preset} --dataset {dataset}"
            )
        apply_toy_preset(config)

    if preset == "smoke":
        config.data = dataclasses.replace(
            config.data, train_split="train", resize_long=(48, 96), crop_size=64, num_workers=0
        )
        config.network = NetworkConfig(backbone="tiny", weights="none")
        config.train_cam = dataclasses.replace(config.train_cam, epochs=2, batch_size=8, log_every=2)
        config.train_clims.train = dataclasses.replace(
            config.train_clims.train, epochs=1, batch_size=8, lr=1e-2, log_every=2
        )
        config.train_clims.clip = TINY_CLIP_NAME
        config.train_clims.clip_pretrained = "none"
        config.make_cam = dataclasses.replace(config.make_cam, batch_size=4)
        config.eval_cam.overlays = 4
        # Stages 6-8 at tiny sizes; the random walk and the CRF still run on the real image sizes.
        config.train_aff = dataclasses.replace(
            config.train_aff,
            train=dataclasses.replace(config.train_aff.train, epochs=1, log_every=2),
            backbone="tiny",
            weights="none",
            crop_size=64,
            resize_long=(64, 128),
        )
        config.make_rw.exponent = 5
        config.train_seg = dataclasses.replace(
            config.train_seg,
            train=dataclasses.replace(config.train_seg.train, max_steps=6, lr=1e-2, log_every=2),
            backbone="tiny",
            weights="none",
            crop_size=65,
        )
        config.eval_seg = dataclasses.replace(config.eval_seg, scales=(1.0, 0.5))
    return config


def apply_toy_preset(config: PipelineConfig) -> None:
    """The toy world (docs/toyworld.md): 64-pixel images, a small stride-4 CAM net, the tiny CLIP of stage
    ``train_clip``. Loss weights, learning rates and steps were tuned on the masks of the ``train`` split;
    CAM quality is reported on ``val``, which no setting was chosen on."""
    config.data = dataclasses.replace(
        config.data,
        train_split="train_aug",
        eval_split="val",
        resize_long=(56, 72),
        crop_size=64,
        num_workers=0,
    )
    config.network = NetworkConfig(backbone="toy", weights="none")
    # AdamW: the toy backbone starts from random weights (the paper's starts from ImageNet). SGD (lr 0.1,
    # 3 epochs) left it near the label-frequency prior on objects cut out of their backgrounds.
    config.train_cam = TrainConfig(
        epochs=4,
        batch_size=32,
        lr=1e-3,
        head_lr_mult=1.0,
        optimizer="adamw",
        weight_decay=1e-4,
        schedule="cosine",
        log_every=50,
    )
    config.train_clip = ClipTrainConfig(
        enabled=True,
        model="clims-tiny-clip",
        pretrained="none",
        captions="toy",
        caption_splits=("train_aug", "background_only_train"),
        epochs=5,
        lr=2e-3,
        weight_decay=0.1,
        batch_size=128,
        # A CLIP that scores a dimmed or cut-out view the way CLIMS needs (docs/toyworld.md, sessions 2-4).
        toy_corpus="web_dark",
        fixed_logit_scale=100.0,
    )
    config.train_clims.clip = "clims-tiny-clip"
    config.train_clims.clip_pretrained = "train_clip"  # the file stage train_clip writes
    config.train_clims.loss_weights = dict(TOY_LOSS_WEIGHTS)
    config.train_clims.train = TrainConfig(
        epochs=1,
        batch_size=16,
        lr=0.002,
        head_lr_mult=1.0,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        max_steps=TOY_CLIMS_STEPS,
        log_every=20,
    )
    # Scales 1.0 and 0.5 (+ flip): on 400 `train` images (the tuning split) they gave a higher CAM mIoU than
    # the paper's (1.0, 0.5, 1.5, 2.0) for both the baseline (20.4 vs 18.9) and CLIMS (17.4 vs 15.7) networks
    # at 8x the speed (53 vs 6.7 images/s on one core): upscaled 64-pixel images add no detail.
    config.make_cam = dataclasses.replace(config.make_cam, scales=(1.0, 0.5), batch_size=64)
    config.eval_cam.overlays = 8
    config.train_aff = dataclasses.replace(
        config.train_aff,
        train=dataclasses.replace(config.train_aff.train, epochs=1, batch_size=16, lr=0.05, log_every=50),
        backbone="tiny",
        weights="none",
        crop_size=64,
        resize_long=(56, 72),
    )
    config.make_rw = dataclasses.replace(config.make_rw, exponent=5, crf=False)
    config.train_seg = dataclasses.replace(
        config.train_seg,
        # The toy backbone at stride 4 with AdamW: the tiny stride-8 net (8 x 8 logits, SGD, 300 steps)
        # learned only the background and the train (val mIoU 15.2 vs 29.1 on the same pseudo masks).
        train=dataclasses.replace(
            config.train_seg.train,
            max_steps=600,
            batch_size=16,
            lr=2e-3,
            optimizer="adamw",
            log_every=50,
        ),
        backbone="toy",
        weights="none",
        crop_size=65,
        scales=(0.9, 1.0, 1.1),
    )
    config.eval_seg = dataclasses.replace(config.eval_seg, scales=(1.0,), crf=False, test_split="")


#: The toy world's loss weights (alpha, beta, gamma, delta) and CLIMS steps, tuned on the train split's
#: masks (first 400 images, seeds 0 and 1). REG 8 / 16 / 20 / 24 gave full-CLIMS CAM mIoU 32.0 / 37.9 / 41.7 /
#: 41.1 (seed 0; seed 1: 32.8 / 37.2 / 36.9 / 40.0); REG 32 lost the bird maps and REG 48 every map but the
#: train's, so 20 keeps a margin below that edge. 60 / 250 steps instead of 120: 29.4 / 26.4 (REG 8).
TOY_LOSS_WEIGHTS: dict[str, float] = {"otm": 10.0, "btm": 25.0, "cbs": 29.5, "reg": 20.0}
TOY_CLIMS_STEPS = 120


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train_cam.epochs=3"`` -> (["train_cam", "epochs"], 3). Values are JSON if they parse, else text."""
    if "=" not in text:
        raise ValueError(f"expected --set SECTION.FIELD=VALUE, got {text!r}")
    key, raw_value = text.split("=", 1)
    try:
        value = json.loads(raw_value)
    except json.JSONDecodeError:
        value = raw_value
    return key.strip().split("."), value


def apply_override(config: PipelineConfig, text: str) -> None:
    """Set one field named by a dotted path, checking that the path exists (typos must not pass silently)."""
    path, value = parse_override(text)
    target: Any = config
    for depth, name in enumerate(path):
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            known = [f.name for f in dataclasses.fields(target)] if dataclasses.is_dataclass(target) else []
            raise ValueError(
                f"--set {text!r}: {'.'.join(path[: depth + 1])!r} is not a config field (known here: {known})"
            )
        if depth == len(path) - 1:
            current = getattr(target, name)
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(target, name, value)
        else:
            target = getattr(target, name)
