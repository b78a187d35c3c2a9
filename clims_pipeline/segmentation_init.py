"""DeepLabV2 initialisation from a local file (``train_seg.weights=/path/to/file``), in one of three layouts.

The layout is recognised from the keys (after dropping the wrappers' prefixes ``module.`` (DataParallel /
DDP), ``base.`` (an MSC wrapper) and ``scale.`` (deeplab-pytorch's first MSC)):

``pipeline``
    This pipeline's own DeepLabV2 (``backbone.<i>...``, ``aspp.branches.<i>...``), e.g. another run's
    ``train_seg/model.pt``.
``torchvision``
    A torchvision ResNet-101 (``conv1``, ``bn1``, ``layer1``-``layer4``; ``fc`` is not used), e.g.
    ``resnet101-63fe2227.pth``.
``deeplab-pytorch``
    The files of kazuto1011/deeplab-pytorch and of the CLIMS repository's DeepLabV2 (which is built on it):
    the Caffe-converted initialisations ``deeplabv1_resnet101-coco.pth`` (the DeepLab authors' COCO
    ``init.caffemodel``; its ``fc`` is a 91-class 1x1 classifier) and ``deeplabv1_resnet101-imagenet.pth``
    (CLIMS's ImageNet initialisation), and trained DeepLabV2-MSC checkpoints such as
    ``deeplabv2_resnet101_msc-vocaug-20000.pth`` (21 classes) or
    ``deeplabv2_resnet101_msc-cocostuff164k-100000.pth`` (182 classes). Key mapping (``j`` counts from 1
    there, from 0 here)::

        layer1.conv1.conv / .bn                       -> backbone.0 / backbone.1       (conv1, bn1)
        layer{2,3,4,5}.block{j}.reduce.conv / .bn     -> backbone.{4,5,6,7}.{j-1}.conv1 / .bn1
                                .conv3x3.conv / .bn   ->                     .conv2 / .bn2
                                .increase.conv / .bn  ->                     .conv3 / .bn3
                                .shortcut.conv / .bn  ->                     .downsample.0 / .downsample.1
                                (older files: .proj)
        aspp.c{i} (older files: aspp.stages.c{i})     -> aspp.branches.{i}
        fc                                            -> not used (DeepLabV1's classifier)

    Two things differ from torchvision and are handled or stated:

    * **Input convention (converted).** These weights expect BGR images in 0-255 minus the mean
      (B 104.008, G 116.669, R 122.675), the pipeline feeds RGB in ImageNet normalisation. The loader
      reorders ``conv1``'s input channels to RGB and scales them by ``255 * std``, and folds the small
      difference of the two means (at most one grey level) into ``bn1``'s running mean, so the first layer
      computes what it computed in deeplab-pytorch (exactly, away from the 3-pixel zero-padded border).
    * **Architecture (not converted).** The network stays torchvision's ResNet-101 layout, which is not
      the one these weights were trained in: Caffe's ResNet strides in the first 1x1 conv of a stage's first
      bottleneck (``reduce``), torchvision in its 3x3 conv; deeplab-pytorch dilates every block of
      ``layer4``/``layer5`` by 2/4, torchvision's first block of ``layer3``/``layer4`` keeps the previous
      dilation (1/2); and its stem max-pool rounds up (``ceil_mode``), torchvision's down. The loaded
      features are therefore close to, not identical with, deeplab-pytorch's; fine-tuning adapts them. The
      report (printed and logged by ``train_seg``) says so.

Every layout loads the whole backbone (BatchNorm running statistics included: they stay frozen) or raises,
naming the missing and unmatched keys. The ASPP head is loaded when its class count matches the model's and
otherwise kept at its initialisation (reported), as is a head the file does not have.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clims_loss import IMAGENET_MEAN, IMAGENET_STD

#: deeplab-pytorch's (Caffe's) input: BGR, 0-255, minus this per-channel mean (B, G, R), no scaling.
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)

LAYOUTS = ("pipeline", "torchvision", "deeplab-pytorch")
_WRAPPER_PREFIXES = ("module.", "base.", "scale.")
_UNUSED = "unused"  # a key the layout knows and DeepLabV2 does not need (a classifier)

_DEEPLAB_PYTORCH_BRANCH = {
    "reduce": ("conv1", "bn1"),
    "conv3x3": ("conv2", "bn2"),
    "increase": ("conv3", "bn3"),
    "shortcut": ("downsample.0", "downsample.1"),
    "proj": ("downsample.0", "downsample.1"),
}
_DEEPLAB_PYTORCH_STEM = re.compile(r"layer1\.conv1\.(conv|bn)\.(\w+)")
_DEEPLAB_PYTORCH_BLOCK = re.compile(
    r"layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut|proj)\.(conv|bn)\.(\w+)"
)
_DEEPLAB_PYTORCH_ASPP = re.compile(r"aspp\.(?:stages\.)?c(\d+)\.(weight|bias)")
_TORCHVISION_STEM = re.compile(r"(conv1|bn1)\.(\w+)")
_TORCHVISION_BLOCK = re.compile(r"layer([1-4])\.(\d+\..+)")

ARCHITECTURE_NOTE = (
    "deeplab-pytorch weights run in torchvision's ResNet-101 layout, not the Caffe one they were trained "
    "in: layer2 (its layer3) strides in the 3x3 conv instead of the first 1x1 conv, the first blocks of "
    "layer3/layer4 (its layer4/layer5) keep dilation 1/2 instead of 2/4, and the stem max-pool rounds down "
    "instead of up; the features are close, not identical, and fine-tuning adapts them"
)
INPUT_NOTE = (
    "conv1 converted from deeplab-pytorch's BGR 0-255 mean-subtracted input to the pipeline's RGB "
    "ImageNet normalisation (channels reordered and scaled by 255*std, mean difference folded into bn1)"
)


@dataclass
class SegmentationInitReport:
    """What :func:`load_segmentation_init` did: the layout, the tensors loaded, the keys not loaded."""

    path: str
    layout: str
    loaded: int
    #: reason -> keys (of the file, or of the model for "kept at initialisation") that were not loaded
    skipped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"init from {self.path} ({self.layout} layout): {self.loaded} tensors loaded"]
        parts += [f"{len(keys)} {reason} (e.g. {keys[0]})" for reason, keys in self.skipped.items() if keys]
        return "; ".join(parts) + "".join(f"\n  note: {note}" for note in self.notes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _translate_pipeline(key: str) -> str | None:
    return key if key.startswith(("backbone.", "aspp.")) else None


def _translate_torchvision(key: str) -> str | None:
    if key.startswith("fc."):
        return _UNUSED
    if match := _TORCHVISION_STEM.fullmatch(key):
        module, name = match.groups()
        return f"backbone.{0 if module == 'conv1' else 1}.{name}"
    if match := _TORCHVISION_BLOCK.fullmatch(key):
        layer, rest = match.groups()
        return f"backbone.{int(layer) + 3}.{rest}"
    return None


def _translate_deeplab_pytorch(key: str) -> str | None:
    if key.startswith("fc."):
        return _UNUSED
    if match := _DEEPLAB_PYTORCH_STEM.fullmatch(key):
        part, name = match.groups()
        return f"backbone.{0 if part == 'conv' else 1}.{name}"
    if match := _DEEPLAB_PYTORCH_BLOCK.fullmatch(key):
        layer, block, branch, part, name = match.groups()
        conv, bn = _DEEPLAB_PYTORCH_BRANCH[branch]
        return f"backbone.{int(layer) + 2}.{int(block) - 1}.{conv if part == 'conv' else bn}.{name}"
    if match := _DEEPLAB_PYTORCH_ASPP.fullmatch(key):
        index, name = match.groups()
        return f"aspp.branches.{index}.{name}"
    return None


_TRANSLATORS: dict[str, Callable[[str], str | None]] = {
    "pipeline": _translate_pipeline,
    "torchvision": _translate_torchvision,
    "deeplab-pytorch": _translate_deeplab_pytorch,
}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file (a state dict, or a checkpoint holding one under ``state_dict``/
    ``model``), with the wrappers' prefixes dropped."""
    if not path.is_file():
        raise FileNotFoundError(f"train_seg.weights: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"train_seg.weights {path}: not a PyTorch state dict file, or truncated or corrupt "
            f"({type(error).__name__}: {error}); point train_seg.weights at a complete .pth file"
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"train_seg.weights {path}: expected a state dict, got a {type(state).__name__}")
    tensors = {}
    for key, value in state.items():
        if not (isinstance(key, str) and torch.is_tensor(value)):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key.removeprefix(prefix), True
        tensors[key] = value
    if not tensors:
        raise ValueError(f"train_seg.weights {path}: the file holds no tensors")
    return tensors


def _best_layout(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, str | None]]:
    """The layout that recognises most keys, with its translation of every key (None: unrecognised)."""
    best, best_count, best_translation = LAYOUTS[0], -1, {}
    for layout in LAYOUTS:
        translation = {key: _TRANSLATORS[layout](key) for key in state}
        count = sum(target is not None for target in translation.values())
        if count > best_count:
            best, best_count, best_translation = layout, count, translation
    return best, best_translation


def convert_caffe_input(
    conv1: torch.Tensor, bn1_running_mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """deeplab-pytorch's ``conv1`` weight (64, 3 BGR, 7, 7) for BGR 0-255 mean-subtracted input and its
    ``bn1`` running mean -> the pair for RGB ImageNet-normalised input.

    A pixel ``p`` (0-255) is ``p - mean_bgr`` there and ``(p / 255 - m) / s`` here, so channel ``c`` (RGB)
    of the new weight is ``255 * s_c`` times the old weight's channel for the same colour, and the old
    conv's response to the constant ``255 * m - mean`` (per colour) is subtracted from the running mean.
    """
    weight = conv1.double()
    scale = 255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float64)
    delta = 255.0 * torch.tensor(IMAGENET_MEAN, dtype=torch.float64) - torch.tensor(CAFFE_MEAN_BGR[::-1])
    rgb = weight.flip(1)  # input channels B, G, R -> R, G, B
    offset = (rgb.sum(dim=(2, 3)) * delta).sum(dim=1)
    converted = rgb * scale[None, :, None, None]
    return converted.to(conv1.dtype), (bn1_running_mean.double() - offset).to(bn1_running_mean.dtype)


def load_segmentation_init(model: nn.Module, path: Path) -> SegmentationInitReport:
    """Load ``path`` (any layout of the module docstring) into a DeepLabV2 ``model``; return the report.

    Raises ``ValueError`` naming the missing backbone keys and the file's unmatched keys when the file does
    not cover the model's backbone (not a ResNet-101 in a known layout), or a backbone shape differs.
    """
    state = read_state_dict(path)
    layout, translation = _best_layout(state)
    own = model.state_dict()
    unrecognised = sorted(key for key, target in translation.items() if target is None)
    if all(target in (None, _UNUSED) for target in translation.values()):
        raise ValueError(
            f"train_seg.weights {path}: not a DeepLabV2 / ResNet-101 state dict in a known layout "
            f"({', '.join(LAYOUTS)}); unmatched keys, e.g. {unrecognised[:8]}"
        )

    mapped: dict[str, torch.Tensor] = {}
    skipped: dict[str, list[str]] = {}
    mismatched: list[str] = []
    for key, target in translation.items():
        if target is None or target == _UNUSED:
            continue
        value = state[key]
        if target not in own:
            skipped.setdefault("keys with no counterpart in the model", []).append(key)
        elif own[target].shape != value.shape:
            if target.startswith("aspp."):
                reason = (
                    f"ASPP tensors of a {value.shape[0]}-class head (the model has {own[target].shape[0]} "
                    "classes)"
                )
                skipped.setdefault(reason, []).append(key)
            else:
                mismatched.append(f"{key} {tuple(value.shape)} -> {target} {tuple(own[target].shape)}")
        else:
            mapped[target] = value
    missing = [
        key
        for key in own
        if key.startswith("backbone.") and key not in mapped and not key.endswith("num_batches_tracked")
    ]
    if mismatched or missing:
        unmatched = unrecognised + skipped.get("keys with no counterpart in the model", [])
        raise ValueError(
            f"train_seg.weights {path} ({layout} layout, {sum(t is not None for t in translation.values())} "
            f"of {len(state)} keys recognised) does not fit the model's backbone: "
            + (f"shapes differ: {mismatched[:5]}; " if mismatched else "")
            + (f"backbone keys missing: {len(missing)}, e.g. {missing[:5]}; " if missing else "")
            + f"unmatched keys of the file: {len(unmatched)}, e.g. {unmatched[:8]}"
        )

    notes = []
    if layout == "deeplab-pytorch":
        mapped["backbone.0.weight"], mapped["backbone.1.running_mean"] = convert_caffe_input(
            mapped["backbone.0.weight"], mapped["backbone.1.running_mean"]
        )
        notes += [INPUT_NOTE, ARCHITECTURE_NOTE]
    model.load_state_dict(mapped, strict=False)

    unused = sorted(key for key, target in translation.items() if target == _UNUSED)
    if unused:
        skipped["classifier tensors DeepLabV2 does not use"] = unused
    if unrecognised:
        skipped["unrecognised keys"] = unrecognised
    head_at_init = [key for key in own if key.startswith("aspp.") and key not in mapped]
    if head_at_init:
        skipped["ASPP tensors kept at their initialisation"] = head_at_init
    return SegmentationInitReport(str(path), layout, len(mapped), skipped, notes)
