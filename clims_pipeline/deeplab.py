"""DeepLabV2 (Chen et al., TPAMI 2018) as the CLIMS paper trains it through deeplab-pytorch.

* Backbone: ResNet-101 with ``layer3`` and ``layer4`` dilated (rates 2 and 4) instead of strided, so the
  output stride is 8 (logits of an ``H x W`` input are ``ceil(H/8) x ceil(W/8)``).
* ASPP: four parallel 3x3 convolutions with dilation rates 6, 12, 18 and 24 straight to class logits, summed.
* MSC (multi-scale inputs): the network also runs on the input rescaled by 0.5 and 0.75; every output is
  resized to the full-scale logits and the fused output is their element-wise **max**. Training supervises
  all of them (full, each scale, max); inference uses the max.

BatchNorm statistics stay frozen (batches of 10 crops of 321 pixels are too small to estimate them), as in the
reference. ``backbone="tiny"`` swaps ResNet-101 for a small stride-8 conv net, for CPU tests and smoke runs;
``backbone="small"`` for the CAM network's stride-4 ``SmallImageBackbone`` (64-pixel images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum
from .networks import SmallImageBackbone, fetch_imagenet_state, freeze_batchnorm_statistics
from .segmentation_init import SegmentationInitReport, load_segmentation_init

DEEPLAB_ATROUS_RATES = (6, 12, 18, 24)
#: ASPP rates for the small backbone's 16 x 16 maps (64-pixel images at stride 4): about the same parts of
#: the map as the reference's rates on its 41 x 41 maps (321-pixel crops at stride 8).
SMALL_ATROUS_RATES = (2, 4, 6, 8)
#: Half the CAM network's widths: about as good and twice as fast on the toy world (measured once each on
#: the same pseudo masks, val mIoU: full widths, 500 steps, 29.5 in 167 s; half, 600 steps, 29.1 in 78 s).
SMALL_WIDTHS = (16, 32, 48, 64)
MSC_SCALES = (0.5, 0.75)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, DeepLabV2 form: the sum of dilated 3x3 convolutions to the logits."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = DEEPLAB_ATROUS_RATES):
        super().__init__()
        branches = [
            nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True) for rate in rates
        ]
        self.branches = nn.ModuleList(branches)
        for branch in branches:
            nn.init.normal_(branch.weight, mean=0.0, std=0.01)
            assert branch.bias is not None  # built with bias=True
            nn.init.zeros_(branch.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(features) for branch in self.branches]).sum(dim=0)


class _TinyStride8Backbone(nn.Sequential):
    out_channels = 32

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        for cin, cout in ((3, 8), (8, 16), (16, 32)):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
        layers += [nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
        super().__init__(*layers)


def _resnet101_stride8(weights: str) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    if weights == "imagenet":
        state = fetch_imagenet_state(
            torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
            "pass a local file with --set train_seg.weights=/path/to/file.pth (a torchvision ResNet-101, a "
            "deeplab-pytorch file such as deeplabv1_resnet101-coco.pth, or a DeepLabV2 of this pipeline), "
            "or 'none'",
        )
        model.load_state_dict(state)
    backbone = nn.Sequential(
        model.conv1,
        model.bn1,
        model.relu,
        model.maxpool,
        model.layer1,
        model.layer2,
        model.layer3,
        model.layer4,
    )
    # nn.Module.__setattr__ is typed for tensors and modules only; any attribute is accepted at run time.
    backbone.out_channels = 2048  # type: ignore[assignment]
    return backbone


class DeepLabV2(nn.Module):
    """Backbone (output stride 8; 4 for "small") + ASPP. ``forward`` returns logits at the output stride."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        weights: str = "imagenet",
        rates: Sequence[int] | None = None,
    ):
        super().__init__()
        if backbone == "resnet101":
            self.backbone: nn.Module = _resnet101_stride8(weights if weights == "imagenet" else "none")
        elif backbone == "tiny":
            self.backbone = _TinyStride8Backbone()
        elif backbone == "small":
            self.backbone = SmallImageBackbone(widths=SMALL_WIDTHS)
        else:
            raise ValueError(f"expected backbone 'resnet101', 'tiny' or 'small', got {backbone!r}")
        if rates is None:
            rates = SMALL_ATROUS_RATES if backbone == "small" else DEEPLAB_ATROUS_RATES
        # Every backbone above has an int out_channels (a class attribute, or set by _resnet101_stride8).
        self.aspp = ASPP(cast(int, self.backbone.out_channels), num_classes, rates)
        self.num_classes = num_classes
        #: What a local init file gave (layout, tensors loaded and skipped, notes); None without a file.
        self.init_report: SegmentationInitReport | None = None
        if weights not in ("imagenet", "none"):
            self.init_report = load_segmentation_init(self, Path(weights))

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        freeze_batchnorm_statistics(self)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.aspp(self.backbone(images))
        return logits


class MSC(nn.Module):
    """Multi-scale inputs around a segmentation network, fused by element-wise max.

    In training mode ``forward`` returns ``[full, *each scale, max]`` (all at the full-scale logit size), in
    eval mode the fused max only.
    """

    def __init__(self, base: DeepLabV2, scales: Sequence[float] = MSC_SCALES):
        super().__init__()
        self.base = base
        self.scales = tuple(scales)

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def train(self, mode: bool = True) -> MSC:
        super().train(mode)
        self.base.train(mode)
        return self

    def scale_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[full, *each scale]``, every one resized to the full-scale logits."""
        full = self.base(images)
        outputs = [full]
        for scale in self.scales:
            scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            logits = self.base(scaled)
            outputs.append(F.interpolate(logits, size=full.shape[-2:], mode="bilinear", align_corners=False))
        return outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = self.scale_outputs(images)
        fused = torch.stack(outputs).amax(dim=0)
        return [*outputs, fused] if self.training else fused

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, ASPP parameters): the ASPP head learns 10x faster, as in the reference."""
        backbone = [p for p in self.base.backbone.parameters() if p.requires_grad]
        head = [p for p in self.base.aspp.parameters() if p.requires_grad]
        return backbone, head


def build_deeplab(
    num_classes: int,
    backbone: str = "resnet101",
    weights: str = "imagenet",
    msc_scales: Sequence[float] = MSC_SCALES,
) -> MSC:
    return MSC(DeepLabV2(num_classes, backbone, weights), msc_scales)


def msc_loss(
    outputs: list[torch.Tensor], labels: torch.Tensor, ignore_index: int = 255, world_size: int = 1
) -> torch.Tensor:
    """Cross-entropy summed over the MSC outputs; labels (B, H, W) are resized to the logits (nearest).

    Each term is the mean over the labelled pixels of the batch (0 when there are none). With ``world_size``
    > 1 (one rank of a DDP step) the mean is over the labelled pixels of *all* ranks' batches (one
    all-reduce of the count) times ``world_size``: the ranks' crops hold different numbers of ignored
    pixels (padding, void), and DDP's average of the ranks' gradients then equals the gradient of one process
    on the whole global batch.
    """
    size = outputs[0].shape[-2:]
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    labelled = (resized != ignore_index).sum().to(torch.float32)
    if world_size > 1:
        labelled = all_reduce_sum(labelled.clone())
    scale = world_size / labelled.clamp_min(1.0)
    return sum(
        (
            F.cross_entropy(logits.float(), resized, ignore_index=ignore_index, reduction="sum") * scale
            for logits in outputs
        ),
        start=torch.zeros((), device=labels.device),
    )


@torch.no_grad()
def multiscale_probabilities(
    model: MSC, image: torch.Tensor, scales: Sequence[float], flip: bool
) -> torch.Tensor:
    """Softmax probabilities (K, H, W) of one normalised image (1, 3, H, W): the MSC output at each test scale
    (and its mirror image) upsampled to the image and averaged."""
    height, width = image.shape[-2:]
    total = None
    count = 0
    for scale in scales:
        scaled = (
            image
            if scale == 1.0
            else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        )
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        logits = model(batch).float()
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        probabilities = F.interpolate(
            logits, size=(height, width), mode="bilinear", align_corners=False
        ).softmax(1)
        summed = probabilities.sum(0)
        total = summed if total is None else total + summed
        count += len(probabilities)
    if total is None:
        raise ValueError("expected at least one test scale")
    return total / count
