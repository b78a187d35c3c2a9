"""Every hyper-parameter of the pipeline, in one place.

A run's configuration is ``build_config(preset, variant, dataset)`` plus ``--set section.field=value``
overrides.

* ``image_size``: ``paper`` (the paper's sizes: ResNet-50, crop 512, ...) or ``small`` (images of about 64
  pixels: 64-pixel crops, the small stride-4 backbone trained from scratch with AdamW, and the training,
  inference and refinement settings that go with them). It does not depend on the data set
  (:data:`IMAGE_SIZES`).
* ``preset``: ``full`` (nothing beyond the image size), ``smoke`` (a tiny backbone, tiny crops and a tiny
  random CLIP, so that all stages finish in minutes on a CPU), or a plug-in's (:func:`register_preset`, e.g.
  ``toy``: the small image size plus the toy world's CLIP, captions and loss weights). A preset may name
  the image size it is made for; it is applied after the image size, on top of it.
* ``variant``: which CLIMS recipe ``train_clims`` follows. ``paper`` is the camera-ready paper (loss weights
  10/25/29.5/1.15, class-specific backgrounds, 10 epochs, cosine lr); ``official`` is the improved recipe of
  the
  authors' repository root (10/24/1/0.2, a global background list with a hinged CBS, 15 epochs, poly lr).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

VARIANTS = ("paper", "official")

#: Presets: a function that adjusts a built config in place. ``full`` and ``smoke`` are built in; plug-ins
#: add theirs with :func:`register_preset`.
PRESETS: dict[str, Callable[[PipelineConfig], None]] = {}
#: The image size a preset is made for (it applies on top of it); presets not named here take any.
PRESET_IMAGE_SIZES: dict[str, str] = {}
#: What the numbers of each preset can be compared with (the header of ``results.md``).
PRESET_CAVEATS: dict[str, str] = {
    "smoke": "The `smoke` preset uses tiny networks: a plumbing check, not a reproduction; only the `full` "
    "preset is comparable with the paper.",
    "full": "The `full` preset is the paper's configuration: comparable with the paper's figures.",
}


def register_preset(
    name: str,
    apply: Callable[[PipelineConfig], None],
    caveat: str | None = None,
    image_size: str | None = None,
) -> None:
    """Add a preset; ``caveat`` says in ``results.md`` what its numbers can be compared with;
    ``image_size`` names the :data:`IMAGE_SIZES` entry it is made for (applied first)."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is registered twice")
    if image_size is not None and image_size not in IMAGE_SIZES:
        raise ValueError(
            f"preset {name!r}: expected image_size one of {sorted(IMAGE_SIZES)}, got {image_size!r}"
        )
    PRESETS[name] = apply
    if caveat is not None:
        PRESET_CAVEATS[name] = caveat
    if image_size is not None:
        PRESET_IMAGE_SIZES[name] = image_size


@dataclass
class DataConfig:
    root: str = ""  # the data set's directory (VOCdevkit/VOC2012, the COCO root, ...); "" for none
    train_split: str = "train_aug"
    eval_split: str = "train"
    resize_long: tuple[int, int] = (320, 640)  # random rescale: the long side is drawn from this range
    crop_size: int = 512
    num_workers: int = 4
    # The class set: a registry JSON (clims_loss.BackgroundPromptRegistry) or a class-name file (one class a
    # line, optionally "name: prompt words"); "" = the data set's own (VOC's 20, COCO's 80), or the root's
    # classes.json / classes.txt when it has one (docs/own-data.md).
    classes: str = ""


@dataclass
class NetworkConfig:
    backbone: str = (
        "resnet50"  # networks.BACKBONES: "resnet50" (the paper's), "tiny" (tests), "small" (64 px)
    )
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
    # Also write checkpoint.pt every this many steps (None: at the end of every epoch only, as always; a
    # checkpoint is also written on SIGTERM). It does not change the result, so it is not in the fingerprint.
    checkpoint_every: int | None = None


@dataclass
class CollapseAlarmConfig:
    """``train_clims``'s collapse alarm (docs/readiness.md): the rule of ``clims_loss.detect_collapse``,
    checked every step over the last ``train.log_every`` steps. It changes no weight, so it is not in the
    fingerprint."""

    enabled: bool = True
    fraction: float = 0.25  # vanished: mean activation on the class's images < fraction x the baseline's
    flood_level: float = (
        0.6  # flooded: mean activation on images without the class > this (and the baseline's)
    )
    reference_images: int = 8  # the baseline's activation is measured on up to this many images per class


@dataclass
class ClimsConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=2.5e-4))
    # The prompt registry: a clims_loss.BackgroundPromptRegistry preset name, a registry JSON file, or
    # "dataset" (the registry of the data set's class file). Set from the data set and variant.
    prompts: str = "voc"
    loss_weights: dict[str, float] | None = None  # None: the prompt preset's own weights (otm, btm, cbs, reg)
    clip: str = "ViT-B-32"
    clip_pretrained: str = "openai"  # an open_clip tag, a local checkpoint file, or "none" (random init)
    clip_config: str = ""  # an extra open_clip model-config JSON; its file stem becomes a model name
    # Background prompts: "preset" (the variant's), "mined" (stage mine_backgrounds' file) or a registry JSON.
    backgrounds: str = "preset"
    # The recipe on top of the registry; "" / None keep the registry's own value (clims_loss.prompts).
    template: str = ""  # object prompt, e.g. "a photo of a {}." (one {} for the class's prompt words)
    background_template: str = ""
    cbs_threshold: float | None = None  # hinge of CBS (a registry file can also switch it off)
    cbs_prompt_reduction: str = ""  # "mean" or "sum" over a pair's background prompts
    cbs_reduction: str = ""  # "mean" or "sum" of CBS over pairs
    pair_reduction: str = ""  # "mean" or "sum" of OTM and BTM over pairs
    reg_positive_only: bool | None = None  # REG over the present classes' maps only (else all B x K maps)
    masking: str = ""  # "pixel" or "pass_through"
    collapse_alarm: CollapseAlarmConfig = field(default_factory=CollapseAlarmConfig)


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
    """Stage ``train_clip``: CLIP trained from scratch or fine-tuned on captions.

    ``captions`` names a caption source (``clip_captions.CAPTION_SOURCES``): ``"labels"`` makes the paper's
    label captions ("a photo of boat and person.") from the training split's image labels; plug-ins add
    their own, with ``corpus`` choosing among their variants.
    """

    enabled: bool = False  # off: train_clims uses train_clims.clip_pretrained as given
    model: str = "ViT-B-32"
    pretrained: str = "openai"  # start from this open_clip tag or file; "none" = from scratch
    captions: str = "labels"
    caption_splits: tuple[str, ...] = ("train_aug",)
    # The paper's fine-tuning (Sec. 4.1): 20 epochs, lr 5e-5, weight decay 0.003.
    epochs: int = 20
    lr: float = 5e-5
    weight_decay: float = 0.003
    batch_size: int = 128
    max_steps: int | None = None
    corpus: str = ""  # a variant of the caption source, where it has several ("" = its default)
    fixed_logit_scale: float | None = None  # e.g. 100: CLIP's final temperature, not learned


@dataclass
class CheckClipConfig:
    """Stage ``check_clip``: the CLIP readiness report before CLIMS training (docs/readiness.md)."""

    max_images: int | None = 300  # a seeded random subset of the training split; None = all of it
    margin: float = 0.0  # flag a view scoring above (foreground - margin)
    min_separation: float = 0.5  # flag a class among its images' top-n classes on fewer than this share
    batch_size: int = 8  # images per CAM forward (images of one size go together)
    stop_if_at_risk: bool = False  # stop the pipeline after writing the report when a class is at risk


@dataclass
class MakeCamConfig:
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    batch_size: int = 8  # images of the same size are inferred together
    low_res_stride: int = 4  # the low-resolution map is 1/4 of the image (what PSA / IRN consume)
    splits: tuple[str, ...] = ()  # extra splits to infer; the train and evaluation splits are always included
    source: str = "auto"  # "auto" (train_clims when present, else train_cam), "train_clims" or "train_cam"
    include_train: bool = True  # infer the training split too (train_aff reads it); false: evaluation only
    limit: int | None = None  # only the first N images of each split (eval_cam evaluates the same N)


@dataclass
class EvalCamConfig:
    threshold_min: float = 0.01
    threshold_max: float = 0.95
    threshold_step: float = 0.01
    reference_threshold: float = 0.15  # the official repository's fixed background threshold, reported too
    overlays: int = 16
    overlay_size: int = 192  # height in pixels of each picture in the overlays (small images are enlarged)


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
    radius: int = 5  # pairs within this distance on the feature grid
    low_power: float = 4.0  # background power for the confident foreground
    high_power: float = 32.0  # background power for the confident background
    crf: bool = True  # refine both score maps with the dense CRF (PSA); False: plain arg-max
    feature_stride: int = (
        8  # AffinityNet's output stride, the random walk's grid (PSA: 8; tiny backbone: 4 or 8)
    )
    label_source: str = (
        "cams"  # "cams" (PSA's confident labels) or "ground_truth" (the masks: an oracle check)
    )


@dataclass
class MakeRWConfig:
    """Random walk (stage ``make_rw``): CAMs propagated with AffinityNet's transition matrix."""

    beta: float = 10.0  # A = affinity^beta (PSA: 8; CLIMS camera-ready: 10)
    exponent: int = 8  # 2^exponent walk steps (PSA "logt" 8; CLIMS "exp_times" 8)
    background_power: float = 16.0  # background score (1 - max CAM)^power before the walk (PSA: 16)
    radius: int = 5
    crf: bool = True  # dense CRF on the walked scores (CLIMS camera-ready: "+RW" is evaluated with crf=1)


@dataclass
class TrainIRNConfig:
    """IRNet (stage ``train_irn``): inter-pixel relation labels from the CAMs, then the boundary and
    displacement branches trained on them (the official improved CLIMS run's settings)."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=3, batch_size=32, lr=0.1, weight_decay=1e-4, log_every=50)
    )  # IRN: 3 epochs, batch 32, lr 0.1 poly (displacement branch 10x), weight decay 1e-4
    backbone: str = "resnet50"  # "resnet50" (ImageNet, frozen), "tiny" or "small" (networks.py)
    weights: str = "imagenet"  # "imagenet" (torchvision), "none" or a local ResNet-50 state dict
    freeze_backbone: bool = True  # IRN trains only the two branches; backbones without weights must train
    crop_size: int = 512  # a multiple of 16
    scales: tuple[float, float] = (0.5, 1.5)  # random rescale factor range
    radius: int = 10  # pairs within this distance on the stride-4 grid (training)
    fg_threshold: float = 0.30  # CAM score of the confident foreground (IRN's conf_fg_thres)
    bg_threshold: float = 0.10  # below every CAM: confident background (conf_bg_thres)
    crf: bool = True  # refine both label maps with IRN's label CRF; False: plain arg-max


@dataclass
class MakeSemSegConfig:
    """IRNet's semantic pseudo masks (stage ``make_sem_seg``): the boundary map's random walk of the CAMs."""

    beta: float = 10.0  # affinity^beta
    exponent: int = 8  # 2^exponent walk steps (IRN's exp_times)
    radius: int = 5  # pairs within this distance on the stride-4 grid (inference)
    background_threshold: float = 0.20  # the background score after the walk (IRN's sem_seg_bg_thres)


@dataclass
class RefineConfig:
    """Which refiner's pseudo masks ``train_seg`` trains on, and whether ``--stages all`` runs both."""

    method: str = "psa"  # "psa" (train_aff + make_rw) or "irn" (train_irn + make_sem_seg)
    compare: bool = False  # also run the other refiner (both mIoUs printed and reported)


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
    backbone: str = "resnet101"  # "resnet101", "tiny" or "small" (stride 4, for small images)
    weights: str = (
        "imagenet"  # "imagenet" (torchvision), "none", or a local ResNet-101 / DeepLabV2 state dict
    )
    crop_size: int = 321
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)  # random rescaling of training images
    msc_scales: tuple[float, ...] = (0.5, 0.75)  # the extra input scales of the MSC wrapper
    # "refined" (the pseudo masks of refine.method), "make_rw", "make_sem_seg" or "ground_truth" (a ceiling)
    mask_source: str = "refined"


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
    image_size: str = "paper"  # an IMAGE_SIZES entry: "paper" or "small" (64-pixel images)
    seed: int = 0  # every stage's random seed
    amp: bool = False  # mixed precision (fp16 on CUDA, bf16 on CPU)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train_cam: TrainConfig = field(default_factory=TrainConfig)
    train_clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    mine_backgrounds: MineBackgroundsConfig = field(default_factory=MineBackgroundsConfig)
    train_clims: ClimsConfig = field(default_factory=ClimsConfig)
    check_clip: CheckClipConfig = field(default_factory=CheckClipConfig)
    make_cam: MakeCamConfig = field(default_factory=MakeCamConfig)
    eval_cam: EvalCamConfig = field(default_factory=EvalCamConfig)
    train_aff: TrainAffConfig = field(default_factory=TrainAffConfig)
    make_rw: MakeRWConfig = field(default_factory=MakeRWConfig)
    train_irn: TrainIRNConfig = field(default_factory=TrainIRNConfig)
    make_sem_seg: MakeSemSegConfig = field(default_factory=MakeSemSegConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    train_seg: TrainSegConfig = field(default_factory=TrainSegConfig)
    eval_seg: EvalSegConfig = field(default_factory=EvalSegConfig)
    #: Sections that plug-ins add (:func:`register_config_section`), by name; ``to_dict`` lists them beside
    #: the built-in ones.
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, cls in CONFIG_SECTIONS.items():
            self.sections.setdefault(name, cls())

    def section(self, name: str) -> Any:
        """A plug-in's section (raises naming the registered ones when absent)."""
        if name not in self.sections:
            raise KeyError(f"no config section {name!r}; plug-in sections: {sorted(self.sections)}")
        return self.sections[name]

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        out = {
            name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
            for name, v in values.items()
        }
        out.update({name: dataclasses.asdict(section) for name, section in self.sections.items()})
        return out


#: Config sections of plug-ins: name -> dataclass (every field with a default).
CONFIG_SECTIONS: dict[str, type[Any]] = {}


def register_config_section(name: str, cls: type[Any]) -> None:
    builtin = {f.name for f in dataclasses.fields(PipelineConfig)}
    if name in builtin or name in CONFIG_SECTIONS:
        raise ValueError(f"config section {name!r} exists already")
    CONFIG_SECTIONS[name] = cls


#: A tiny open_clip ViT shipped with the pipeline (``configs/<name>.json``): random weights, for smoke runs.
SMOKE_CLIP_NAME = "clims-smoke-vit"


def build_config(
    preset: str = "full", variant: str = "paper", dataset: str = "voc", image_size: str | None = None
) -> PipelineConfig:
    """The config of a (preset, variant, data set, image size); the data set's class set and prompts come
    from its registered source (``data.DATA_SOURCES``). ``image_size`` None: the one the preset is made for
    (``paper`` for the built-in presets). Applied in this order: variant, data set, image size, preset."""
    from . import simple_layout  # noqa: F401  (registers the simple layout's data source)
    from .data import data_source_spec

    spec = data_source_spec(dataset)  # loads the plug-ins, and so their presets, when needed
    for value, allowed, what in ((preset, tuple(PRESETS), "preset"), (variant, VARIANTS, "variant")):
        if value not in allowed:
            raise ValueError(f"expected --{what} to be one of {allowed}, got {value!r}")
    made_for = PRESET_IMAGE_SIZES.get(preset)
    if image_size is None:
        image_size = made_for or "paper"
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"expected --image-size to be one of {tuple(IMAGE_SIZES)}, got {image_size!r}")
    if made_for is not None and image_size != made_for:
        raise ValueError(
            f"--preset {preset} is made for --image-size {made_for}, got --image-size {image_size}; "
            f"use --preset full --image-size {image_size} for the image size alone"
        )
    config = PipelineConfig(preset=preset, variant=variant, dataset=dataset, image_size=image_size)
    config.train_clims.prompts = spec.prompt_presets[variant]
    if variant == "paper":
        # Paper, Sec. 4.1: "The cosine annealing policy is applied ... trained for 10 epochs".
        config.train_clims.train = TrainConfig(epochs=10, lr=2.5e-4, schedule="cosine")
    else:
        # Official repository: 15 epochs of poly lr from a baseline CAM net, threshold 0.15 for evaluation.
        config.train_clims.train = TrainConfig(epochs=15, lr=2.5e-4, schedule="poly")
        # ... and refines the CAMs with IRNet instead of PSA's AffinityNet.
        config.refine.method = "irn"
    config.data.train_split, config.data.eval_split = spec.train_split, spec.eval_split
    IMAGE_SIZES[image_size](config)
    PRESETS[preset](config)
    return config


def apply_full_preset(config: PipelineConfig) -> None:
    """The paper's sizes: the defaults of the dataclasses above."""
    del config


def apply_smoke_preset(config: PipelineConfig) -> None:
    """Tiny networks, crops and a tiny random CLIP, so that every stage finishes in seconds on a CPU."""
    config.data = dataclasses.replace(
        config.data, train_split="train", resize_long=(48, 96), crop_size=64, num_workers=0
    )
    config.network = NetworkConfig(backbone="tiny", weights="none")
    config.train_cam = dataclasses.replace(config.train_cam, epochs=2, batch_size=8, log_every=2)
    config.train_clims.train = dataclasses.replace(
        config.train_clims.train, epochs=1, batch_size=8, lr=1e-2, log_every=2
    )
    config.train_clims.clip = SMOKE_CLIP_NAME
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
    config.train_irn = dataclasses.replace(
        config.train_irn,
        train=dataclasses.replace(config.train_irn.train, epochs=1, batch_size=8, log_every=2),
        backbone="tiny",
        weights="none",
        freeze_backbone=False,  # random weights: a frozen backbone would give the branches noise
        crop_size=64,
    )
    config.make_sem_seg.exponent = 5
    config.train_seg = dataclasses.replace(
        config.train_seg,
        train=dataclasses.replace(config.train_seg.train, max_steps=6, lr=1e-2, log_every=2),
        backbone="tiny",
        weights="none",
        crop_size=65,
    )
    config.eval_seg = dataclasses.replace(config.eval_seg, scales=(1.0, 0.5))


def apply_paper_sizes(config: PipelineConfig) -> None:
    """The paper's image sizes and networks: the defaults of the dataclasses above."""
    del config


def apply_small_images(config: PipelineConfig) -> None:
    """Images of about 64 pixels, with any data set: 64-pixel crops, the small stride-4 backbone trained from
    scratch, and the training, inference and refinement settings measured on such images (the toy world's,
    docs/toyworld.md). The CLIMS schedule has no step bound here; a preset or ``--set`` adds one."""
    config.data = dataclasses.replace(config.data, resize_long=(56, 72), crop_size=64, num_workers=0)
    config.network = NetworkConfig(backbone="small", weights="none")
    # AdamW: the small backbone starts from random weights (the paper's starts from ImageNet). SGD (lr 0.1,
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
    config.train_clims.train = TrainConfig(
        epochs=1,
        batch_size=16,
        lr=0.002,
        head_lr_mult=1.0,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        log_every=20,
    )
    # Scales 1.0 and 0.5 (+ flip): on 400 toy-world `train` images (the tuning split) they gave a higher CAM
    # mIoU than the paper's (1.0, 0.5, 1.5, 2.0) for both the baseline (20.4 vs 18.9) and CLIMS (17.4 vs
    # 15.7) networks at 8x the speed (53 vs 6.7 images/s on one core): upscaled 64-pixel images add no detail.
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
    # IRNet on small images: the small stride-4 backbone trained with the branches (it has no pretrained
    # weights to freeze), 16 x 16 boundary grids on 64-pixel crops, no CRF.
    config.train_irn = dataclasses.replace(
        config.train_irn,
        train=dataclasses.replace(
            config.train_irn.train,
            epochs=2,
            batch_size=16,
            lr=1e-3,
            head_lr_mult=1.0,
            optimizer="adamw",
            log_every=50,
        ),
        backbone="small",
        weights="none",
        freeze_backbone=False,
        crop_size=64,
        scales=(0.9, 1.1),
        radius=5,
        crf=False,
    )
    config.make_sem_seg = dataclasses.replace(config.make_sem_seg, exponent=5)
    config.train_seg = dataclasses.replace(
        config.train_seg,
        # The small backbone at stride 4 with AdamW: the tiny stride-8 net (8 x 8 logits, SGD, 300 steps)
        # learned only the background and the train (toy val mIoU 15.2 vs 29.1 on the same pseudo masks).
        train=dataclasses.replace(
            config.train_seg.train,
            max_steps=600,
            batch_size=16,
            lr=2e-3,
            optimizer="adamw",
            log_every=50,
        ),
        backbone="small",
        weights="none",
        crop_size=65,
        scales=(0.9, 1.0, 1.1),
    )
    config.eval_seg = dataclasses.replace(config.eval_seg, scales=(1.0,), crf=False)


#: Image sizes (``--image-size``): network and size settings that do not depend on the data set.
IMAGE_SIZES: dict[str, Callable[[PipelineConfig], None]] = {
    "paper": apply_paper_sizes,
    "small": apply_small_images,
}

register_preset("full", apply_full_preset)
register_preset("smoke", apply_smoke_preset)


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


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce_value(annotation: Any, value: Any, where: str) -> Any:
    """``value`` as the field type ``annotation`` (tuples from lists, floats from ints), or a ValueError that
    names ``where``, the expected type and the value."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return coerce_value(option, value, where)
            except ValueError as error:
                errors.append(error)
        raise ValueError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: expected null, got {value!r}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list ({_type_name(annotation)}), got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            coerce_value(a, item, f"{where}[{i}]")
            for i, (a, item) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object ({_type_name(annotation)}), got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {
            coerce_value(key_type, k, where): coerce_value(value_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object of {annotation.__name__}'s fields, got {value!r}")
        return section_from_dict(annotation, value, where)
    raise ValueError(f"{where}: cannot check a value of type {_type_name(annotation)}")


def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(section if isinstance(section, type) else type(section))


def section_from_dict(cls: type[Any], values: dict[str, Any], where: str) -> Any:
    """A config section built from a JSON object, every field checked; unknown fields are errors."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {sorted(types_)}")
    kwargs = {
        name: coerce_value(types_[name], value, f"{where}.{name}" if where else name)
        for name, value in values.items()
    }
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> PipelineConfig:
    """A :class:`PipelineConfig` from its JSON form (``config.json``'s ``config``), every field checked."""
    if not isinstance(values, dict):
        raise ValueError(f"expected a JSON object of config sections, got {type(values).__name__}")
    builtin = {k: v for k, v in values.items() if k not in CONFIG_SECTIONS}
    config: PipelineConfig = section_from_dict(PipelineConfig, builtin, "")
    for name, section in values.items():
        if name in CONFIG_SECTIONS:
            config.sections[name] = coerce_value(CONFIG_SECTIONS[name], section, name)
    return config


def apply_override(config: PipelineConfig, text: str) -> None:
    """Set one field named by a dotted path; the path must exist and the value must have the field's type."""
    path, value = parse_override(text)
    target: Any = config
    if path[0] in config.sections:
        target, path = config.sections[path[0]], path[1:]
        text_prefix = [text.split(".", 1)[0]]
    else:
        text_prefix = []
    for depth, name in enumerate(path):
        known = list(_field_types(target)) if dataclasses.is_dataclass(target) else []
        if target is config:
            known = [k for k in known if k != "sections"] + sorted(config.sections)
        if name not in known:
            raise ValueError(
                f"--set {text!r}: {'.'.join(text_prefix + path[: depth + 1])!r} is not a config field "
                f"(known here: {known})"
            )
        if depth == len(path) - 1:
            try:
                setattr(
                    target,
                    name,
                    coerce_value(_field_types(target)[name], value, f"--set {'.'.join(text_prefix + path)}"),
                )
            except ValueError as error:
                raise ValueError(f"{error} (from {text!r})") from None
        else:
            target = getattr(target, name)
