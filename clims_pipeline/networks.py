"""The CAM networks: a ResNet-50 backbone at output stride 16 and a bias-free 1x1 classifier.

* :class:`CAMNet` (stage ``train_cam``): global average pooling + classifier, trained with a multilabel
  soft-margin loss. Its class activation maps are ``relu(W^T Z)``.
* :class:`CLIMSNet` (stage ``train_clims``): the same modules (so it loads a ``CAMNet`` state dict as is), but
its
  forward pass returns the per-pixel maps ``sigmoid(W^T Z)`` that the CLIP evaluator scores; no pooling.

Both follow the reference ResNet-50 CAM set-up (IRN / CLIMS): ``layer4`` keeps stride 1 without dilation
(output
stride 16), every BatchNorm keeps its ImageNet statistics (batches of 16 crops are too small to re-estimate
them, and frozen statistics make a DDP step equal a single-process one), and the stem (conv1, bn1) is frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .files import load_torch_file


def freeze_batchnorm_statistics(module: nn.Module) -> None:
    """Keep every batch-norm layer in eval mode (frozen running statistics), as the reference trainers do."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


class Backbone(nn.Module):
    """A feature extractor for :class:`CAMNet`: ``forward`` maps images (B, 3, H, W) to features
    (B, ``out_channels``, H / ``output_stride``, W / ``output_stride``)."""

    out_channels: int
    output_stride: int


class ResNet50Backbone(Backbone):
    """torchvision ResNet-50 up to ``layer4``, with ``layer4``'s stride set to 1 (output stride 16)."""

    out_channels = 2048
    output_stride = 16

    def __init__(self, weights: str = "imagenet"):
        super().__init__()
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        if weights == "imagenet":
            state = fetch_imagenet_state(
                torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                "download them once and pass --backbone-weights /path/to/resnet50.pth, "
                "or --backbone-weights none",
            )
            model.load_state_dict(state)
        elif weights != "none":
            load_backbone_state(model, Path(weights))
        # Output stride 16 the IRN way: the first block of layer4 stops striding (no dilation added).
        model.layer4[0].conv2.stride = (1, 1)
        model.layer4[0].downsample[0].stride = (1, 1)
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        self.layers = nn.Sequential(model.layer1, model.layer2, model.layer3, model.layer4)
        for parameter in self.stem.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.layers(self.stem(x))
        return features


def fetch_imagenet_state(weights_enum: Any, local_file_hint: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, or (offline machines fail here) an error saying what to pass."""
    try:
        state: dict[str, torch.Tensor] = weights_enum.get_state_dict(progress=True)
        return state
    except Exception as error:
        raise RuntimeError(
            f"could not fetch torchvision's ImageNet weights ({weights_enum}); {local_file_hint}"
        ) from error


def load_backbone_state(model: nn.Module, path: Path) -> None:
    """Load a ResNet state dict from a local file (a torchvision ``.pth``, or a checkpoint holding one)."""
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights: no such file: {path}")
    state = load_torch_file(
        path, "--backbone-weights: pass a complete torchvision ResNet .pth file", weights_only=True
    )
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"--backbone-weights {path}: not a ResNet-50 state dict "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


class TinyBackbone(Backbone):
    """Four strided conv blocks (output stride 16, ~10k parameters): fast CPU tests and smoke runs."""

    output_stride = 16

    def __init__(self, weights: str = "none", widths: tuple[int, ...] = (8, 16, 24, 32)):
        super().__init__()
        if weights != "none":
            raise ValueError(
                f"the tiny backbone has no pretrained weights; use --backbone-weights none, got {weights!r}"
            )
        blocks: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            blocks += [
                nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            in_channels = width
        self.stem = nn.Sequential(*blocks[:3])
        self.layers = nn.Sequential(*blocks[3:])
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.layers(self.stem(x))
        return features


class SmallImageBackbone(Backbone):
    """A small conv net at output stride 4 for 64-pixel images (e.g. the toy world's) (maps of 16 x 16).

    At output stride 16 a 64-pixel image gives 4 x 4 maps, too coarse to outline an object. Two strided
    convolutions, then three 3x3 ones at stride 4: with ``dilations`` (1, 1, 1) each feature sees about
    31 pixels, an object and its surroundings, so a class map can follow the object. (With dilations
    (2, 4, 2) each feature sees the whole image, the maps stay blobs at the image centre, and CLIMS lowers
    their mIoU instead of raising it: docs/toyworld.md.)

    GroupNorm instead of BatchNorm: trained from scratch, the network needs normalisation, and GroupNorm
    does not depend on the batch (so the CAM net's frozen-BatchNorm rule has nothing to freeze and a DDP
    step equals a single-process step).
    """

    output_stride = 4

    def __init__(
        self,
        weights: str = "none",
        widths: tuple[int, ...] = (32, 64, 96, 128),
        dilations: tuple[int, int, int] = (1, 1, 1),
    ):
        super().__init__()
        if weights != "none":
            raise ValueError(
                f"the small-image backbone has no pretrained weights; use --backbone-weights none, "
                f"got {weights!r}"
            )
        if len(widths) != 4 or len(dilations) != 3:
            raise ValueError(
                f"expected 4 widths and 3 dilations, got widths {widths} and dilations {dilations}"
            )

        def block(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(
                    in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False
                ),
                nn.GroupNorm(8, out_channels),
                nn.ReLU(inplace=True),
            )

        self.stem = block(3, widths[0], stride=2)
        self.layers = nn.Sequential(
            block(widths[0], widths[1], stride=2),
            block(widths[1], widths[2], dilation=dilations[0]),
            block(widths[2], widths[3], dilation=dilations[1]),
            block(widths[3], widths[3], dilation=dilations[2]),
        )
        self.out_channels = widths[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.layers(self.stem(x))
        return features


#: The CAM backbones by name: what ``network.backbone`` and ``--backbone`` accept (the command line takes its
#: choices from here). Each builder gets ``network.weights``.
BACKBONE_BUILDERS: dict[str, Callable[[str], Backbone]] = {
    "resnet50": ResNet50Backbone,
    "tiny": TinyBackbone,
    "small": SmallImageBackbone,
}
BACKBONES = tuple(BACKBONE_BUILDERS)


def build_backbone(name: str, weights: str) -> Backbone:
    if name not in BACKBONE_BUILDERS:
        raise ValueError(f"expected backbone one of {BACKBONES}, got {name!r}")
    return BACKBONE_BUILDERS[name](weights)


class CAMNet(nn.Module):
    """Backbone + bias-free 1x1 classifier. ``forward`` gives image logits (B, K) through GAP."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, kernel_size=1, bias=False)
        self.num_classes = num_classes
        self.output_stride: int = backbone.output_stride

    def train(self, mode: bool = True) -> CAMNet:
        super().train(mode)
        freeze_batchnorm_statistics(self)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        logits: torch.Tensor = self.classifier(features.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return logits

    def activation_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Class activation maps (B, K, h, w) at output stride 16: ``relu(W^T Z)``, unnormalised."""
        return F.relu(self.classifier(self.backbone(images)))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained backbone parameters, freshly initialised head parameters), trainable ones only."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return backbone, head


class CLIMSNet(CAMNet):
    """The CLIMS network: ``forward`` gives the sigmoid maps ``P = sigmoid(W^T Z)`` (B, K, h, w).

    At inference (``activation_maps``) it is read out like a CAM net, ``relu(W^T Z)``, as the reference does.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.classifier(self.backbone(images)))


def build_network(kind: str, backbone: str, weights: str, num_classes: int) -> CAMNet:
    network_class = {"cam": CAMNet, "clims": CLIMSNet}[kind]
    return network_class(build_backbone(backbone, weights), num_classes)
