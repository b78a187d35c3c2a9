"""IRNet (Ahn, Cho & Kwak, CVPR 2019) as the improved official CLIMS run refines its CAMs: inter-pixel
relation labels, the boundary and displacement network, and the boundary-driven random walk.

Notation: the network works on a grid of ``h x w = H/4 x W/4`` nodes (stride :data:`IRN_STRIDE`); pairs join
``p`` to ``p + o`` for the offsets ``o`` of :func:`~clims_pipeline.random_walk.pair_offsets` (radius 10 in
training, 5 at inference).

1. Relation labels (:func:`relation_label_map`): the CAMs with a constant background score
   ``fg_threshold`` (0.30) give the confident foreground; with ``bg_threshold`` (0.10) the confident
   background; each arg-max is optionally smoothed by IRN's label CRF. Foreground of the first map keeps its
   class, background of both is background, the rest is ignored (255). Pair labels are PSA's
   (:func:`~clims_pipeline.random_walk.affinity_label_masks`): same confident label positive, different
   labels negative.
2. The network (:class:`IRNet`): the levels of a backbone, each reduced by a 1x1 conv (GroupNorm, ReLU) and
   resized to the stride-4 grid, feed two branches: a class-boundary logit ``B`` and a 2-channel
   displacement field ``D``. A pair's affinity is ``a(p, q) = 1 - max_{k on the line p..q} sigmoid(B(k))``
   (:func:`boundary_affinities`). Loss (:func:`irn_loss`): ``(L_bg/2 + L_fg/2 + L_neg)/2 +
   (L_dfg + L_dbg)/2``, the first three PSA's cross-entropies, ``L_dfg`` the mean ``|D(p) - D(q) - o|_1 / 2``
   over foreground pairs (both point at the same centroid) and ``L_dbg`` the mean ``|D(p) - D(q)|_1 / 2``
   over background pairs.
3. Semantic pseudo labels (:func:`semantic_labels`, instance-agnostic: the displacement branch is trained as
   IRN does but not read here): the boundary map of the image and its flip, affinities within radius 5,
   ``T = D^-1 A^beta`` (:func:`~clims_pipeline.random_walk.transition_matrix`), the stride-4 CAMs times
   ``1 - B`` walked ``2^exponent`` steps (:func:`~clims_pipeline.random_walk.random_walk`), upsampled by 4,
   divided by their maximum; background where every class scores below ``background_threshold`` (0.20).

IRN's mean-shift layer, which centres the displacement field for instance segmentation, is not built: no
stage here makes instance masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .crf import CRFParams, dense_crf_labels
from .networks import (
    Backbone,
    ResNet50Backbone,
    SmallImageBackbone,
    TinyBackbone,
    build_backbone,
    freeze_batchnorm_statistics,
)
from .random_walk import (
    IGNORE_LABEL,
    affinity_label_masks,
    at_least_float32,
    pad_to_stride,
    pair_counts,
    pair_offsets,
    pair_windows,
    random_walk,
    relation_losses,
    transition_matrix,
)

#: The grid of the boundary map and the displacement field: 1/4 of the image (IRN's).
IRN_STRIDE = 4
#: Image sides must be multiples of this (the deepest backbone level's stride).
INPUT_MULTIPLE = 16


# ------------------------------------------------------------------------------------------------------
# relation labels from CAMs


def relation_label_map(
    image: np.ndarray,
    cams: np.ndarray,
    keys: np.ndarray,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.10,
    crf: CRFParams | None = None,
) -> np.ndarray:
    """The relation label map (H, W) uint8 of one image: 0 confident background, ``k + 1`` confident class
    ``keys[i] = k``, 255 ignored.

    image (H, W, 3) uint8; cams (n, H, W) in [0, 1] for the image's ``n`` positive classes ``keys``
    (0-based). ``crf`` smooths each thresholded arg-max (IRN: :data:`~clims_pipeline.crf.IRN_LABEL_CRF`).
    """
    if cams.shape[0] != len(keys):
        raise ValueError(f"expected one CAM per key, got {cams.shape[0]} CAMs and {len(keys)} keys")
    if not 0.0 <= bg_threshold <= fg_threshold:
        raise ValueError(
            f"expected 0 <= bg_threshold <= fg_threshold, got bg_threshold {bg_threshold} and fg_threshold "
            f"{fg_threshold}"
        )
    class_of_channel = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])

    def confident(threshold: float) -> np.ndarray:
        scores = np.concatenate([np.full((1, *cams.shape[1:]), threshold, dtype=np.float32), cams])
        labels = scores.argmax(axis=0)
        if crf is not None:
            labels = dense_crf_labels(image, labels, len(class_of_channel), crf)
        mapped: np.ndarray = class_of_channel[labels]
        return mapped

    foreground, background = confident(fg_threshold), confident(bg_threshold)
    label = np.where(foreground == 0, IGNORE_LABEL, foreground)
    label[(foreground == 0) & (background == 0)] = 0
    return label.astype(np.uint8)


def class_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """labels (h, w) -> (h, w) float: 1 where a pixel's 8-neighbourhood holds another label, else 0 (the
    boundary map a perfect boundary branch would give; for oracle checks)."""
    if labels.ndim != 2:
        raise ValueError(f"expected labels of shape (h, w), got {tuple(labels.shape)}")
    padded = F.pad(labels[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
    height, width = labels.shape
    boundary = torch.zeros(height, width, dtype=torch.bool, device=labels.device)
    for dy in range(3):
        for dx in range(3):
            boundary |= padded[dy : dy + height, dx : dx + width] != labels.float()
    return boundary.float()


# ------------------------------------------------------------------------------------------------------
# affinities from a boundary map


def path_pixels(offset: tuple[int, int]) -> list[tuple[int, int]]:
    """The pixels ``k`` (offsets from ``p``, both ends included) of the line from ``p`` to ``p + offset``:
    those in its bounding box closer than 1 to the line."""
    dy, dx = offset
    length_sq = dy * dy + dx * dx
    if length_sq == 0:
        raise ValueError("expected a non-zero offset, got (0, 0)")
    return [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq
    ]


def boundary_affinities(boundary: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """boundary (B, h, w) in [0, 1] -> affinities (B, O, h, w): ``1 - max`` of the boundary on the line from
    ``p`` to ``p + o``; 0 where ``p + o`` is outside the grid (such pairs carry no label)."""
    if boundary.ndim != 3:
        raise ValueError(f"expected boundary of shape (B, h, w), got {tuple(boundary.shape)}")
    batch, height, width = boundary.shape
    out = boundary.new_zeros(batch, len(offsets), height, width)
    for index, offset in enumerate(offsets):
        (sy, sx), _ = pair_windows(height, width, offset)
        rows, cols = sy.stop - sy.start, sx.stop - sx.start
        if rows <= 0 or cols <= 0:
            continue
        on_path = [
            boundary[:, sy.start + ky : sy.start + ky + rows, sx.start + kx : sx.start + kx + cols]
            for ky, kx in path_pixels(offset)
        ]
        out[:, index, sy, sx] = 1.0 - torch.stack(on_path).amax(dim=0)
    return out


def irn_loss(
    boundary_logits: torch.Tensor,
    displacement: torch.Tensor,
    labels: torch.Tensor,
    offsets: list[tuple[int, int]],
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IRN's loss ``(L_bg/2 + L_fg/2 + L_neg)/2 + (L_dfg + L_dbg)/2`` (module docstring).

    boundary_logits (B, 1, h, w), displacement (B, 2, h, w) (channels y, x, in grid cells), labels (B, h, w)
    as in :func:`~clims_pipeline.random_walk.affinity_label_masks`. Every term is a mean over the pairs of
    the global batch (``world_size``: see :func:`~clims_pipeline.random_walk.affinity_loss`), so a DDP step
    equals a single-process step.
    """
    if boundary_logits.ndim != 4 or boundary_logits.shape[1] != 1:
        raise ValueError(
            f"expected boundary_logits of shape (B, 1, h, w), got {tuple(boundary_logits.shape)}"
        )
    expected = (boundary_logits.shape[0], 2, *boundary_logits.shape[2:])
    if tuple(displacement.shape) != expected:
        raise ValueError(f"expected displacement of shape {expected}, got {tuple(displacement.shape)}")
    if tuple(labels.shape) != (boundary_logits.shape[0], *boundary_logits.shape[2:]):
        raise ValueError(
            f"expected labels of shape (B, h, w) = {(boundary_logits.shape[0], *boundary_logits.shape[2:])}, "
            f"got {tuple(labels.shape)}"
        )
    masks = affinity_label_masks(labels, offsets)
    affinities = boundary_affinities(torch.sigmoid(at_least_float32(boundary_logits[:, 0])), offsets)
    losses = relation_losses(affinities, masks, world_size)
    background, foreground = masks[0], masks[1]
    counts = pair_counts((background, foreground), world_size)
    displacement = at_least_float32(displacement)
    height, width = labels.shape[1:]
    foreground_sum = displacement.new_zeros(())
    background_sum = displacement.new_zeros(())
    for index, offset in enumerate(offsets):
        (sy, sx), (ty, tx) = pair_windows(height, width, offset)
        difference = displacement[:, :, sy, sx] - displacement[:, :, ty, tx]
        target = torch.tensor(offset, dtype=difference.dtype, device=difference.device).view(1, 2, 1, 1)
        foreground_sum = (
            foreground_sum + ((difference - target).abs().sum(1) * foreground[:, index, sy, sx]).sum()
        )
        background_sum = background_sum + (difference.abs().sum(1) * background[:, index, sy, sx]).sum()
    eps = 1e-5
    losses["dp_fg"] = foreground_sum * world_size / (2 * counts[1] + eps)
    losses["dp_bg"] = background_sum * world_size / (2 * counts[0] + eps)
    loss = (losses["bg"] / 2 + losses["fg"] / 2 + losses["neg"]) / 2 + (losses["dp_fg"] + losses["dp_bg"]) / 2
    return loss, losses


# ------------------------------------------------------------------------------------------------------
# the network


def backbone_levels(backbone: Backbone) -> list[nn.Module]:
    """The successive levels of a CAM backbone (networks.py) whose outputs IRNet reads: ResNet-50's stem
    and ``layer1``-``layer4`` (strides 4, 4, 8, 16, 16), the tiny net's four strided blocks (2, 4, 8, 16),
    the small net's stem and four blocks (2, 4, 4, 4, 4)."""
    if isinstance(backbone, ResNet50Backbone):
        return [backbone.stem, *backbone.layers]
    if isinstance(backbone, TinyBackbone):
        layers = list(backbone.layers)
        return [backbone.stem, *(nn.Sequential(*layers[i : i + 3]) for i in range(0, len(layers), 3))]
    if isinstance(backbone, SmallImageBackbone):
        return [backbone.stem, *backbone.layers]
    raise ValueError(f"IRNet has no level layout for backbone {type(backbone).__name__}")


def _reducer(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.GroupNorm(4, out_channels),
        nn.ReLU(inplace=True),
    )


class IRNet(nn.Module):
    """Backbone levels -> boundary branch (1x1 convs to ``edge_width`` each, concatenated, 1x1 conv with
    bias to one logit) and displacement branch (1x1 convs to ``displacement_width`` each, concatenated,
    1x1 conv + GroupNorm + ReLU, 1x1 conv to 2 channels), both on the stride-4 grid.

    ``forward`` maps images (B, 3, H, W), sides multiples of 16, to (boundary logits (B, 1, H/4, W/4),
    displacement (B, 2, H/4, W/4)). With ``freeze_backbone`` (IRN) only the branches learn; BatchNorm
    statistics stay frozen either way.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str = "imagenet",
        freeze_backbone: bool = True,
        edge_width: int = 32,
        displacement_width: int = 256,
    ):
        super().__init__()
        self.levels = nn.ModuleList(backbone_levels(build_backbone(backbone, weights)))
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for parameter in self.levels.parameters():
                parameter.requires_grad_(False)
        channels = self._level_channels()
        self.edge_reducers = nn.ModuleList([_reducer(c, edge_width) for c in channels])
        self.edge_out = nn.Conv2d(edge_width * len(channels), 1, 1, bias=True)
        self.displacement_reducers = nn.ModuleList([_reducer(c, displacement_width) for c in channels])
        self.displacement_out = nn.Sequential(
            _reducer(displacement_width * len(channels), displacement_width),
            nn.Conv2d(displacement_width, 2, 1, bias=False),
        )

    @torch.no_grad()
    def _level_channels(self) -> list[int]:
        x = torch.zeros(1, 3, INPUT_MULTIPLE * 2, INPUT_MULTIPLE * 2)
        channels = []
        for level in self.levels:
            level.eval()
            x = level(x)
            channels.append(int(x.shape[1]))
        return channels

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        freeze_batchnorm_statistics(self)
        return self

    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        x = images
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            for level in self.levels:
                x = level(x)
                outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            raise ValueError(f"expected image sides divisible by {INPUT_MULTIPLE}, got {height}x{width}")
        grid = (height // IRN_STRIDE, width // IRN_STRIDE)
        features = self.backbone_features(images)

        def fused(reducers: nn.ModuleList) -> torch.Tensor:
            maps = []
            for reducer, level in zip(reducers, features, strict=True):
                reduced = reducer(level)
                if reduced.shape[-2:] != grid:
                    reduced = F.interpolate(reduced, size=grid, mode="bilinear", align_corners=False)
                maps.append(reduced)
            return torch.cat(maps, dim=1)

        boundary: torch.Tensor = self.edge_out(fused(self.edge_reducers))
        displacement: torch.Tensor = self.displacement_out(fused(self.displacement_reducers))
        return boundary, displacement

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone and boundary branch, displacement branch) trainable parameters: IRN trains the
        displacement branch at 10x the learning rate of the boundary branch."""
        first = [p for m in (self.levels, self.edge_reducers, self.edge_out) for p in m.parameters()]
        second = [p for m in (self.displacement_reducers, self.displacement_out) for p in m.parameters()]
        return [p for p in first if p.requires_grad], [p for p in second if p.requires_grad]


def build_irnet(backbone: str, weights: str, freeze_backbone: bool) -> IRNet:
    """IRNet on ``backbone`` (ResNet-50: IRN's widths 32 / 256; the small backbones: 16 / 32)."""
    widths = (32, 256) if backbone == "resnet50" else (16, 32)
    return IRNet(backbone, weights, freeze_backbone, edge_width=widths[0], displacement_width=widths[1])


# ------------------------------------------------------------------------------------------------------
# semantic pseudo labels


@torch.no_grad()
def boundary_map(model: IRNet, image: torch.Tensor) -> torch.Tensor:
    """One normalised image (3, H, W) -> its boundary probabilities (ceil(H/4), ceil(W/4)): the logits of
    the image and of its mirror image averaged, then the sigmoid (IRN's inference)."""
    height, width = image.shape[-2:]
    padded = pad_to_stride(image[None], INPUT_MULTIPLE)
    logits, _ = model(torch.cat([padded, padded.flip(-1)]))
    logits = logits.float()
    boundary = torch.sigmoid(logits[0, 0] / 2 + logits[1, 0].flip(-1) / 2)
    return boundary[: math.ceil(height / IRN_STRIDE), : math.ceil(width / IRN_STRIDE)]


@torch.no_grad()
def semantic_labels(
    boundary: torch.Tensor,
    cams: torch.Tensor,
    keys: np.ndarray,
    image_size: tuple[int, int],
    beta: float = 10.0,
    exponent: int = 8,
    radius: int = 5,
    background_threshold: float = 0.20,
) -> np.ndarray:
    """The semantic pseudo label (H, W) uint8 of one image: 0 background, ``k + 1`` class ``keys[i] = k``.

    boundary (h, w) in [0, 1] and cams (n, h, w) on the stride-4 grid, ``h = ceil(H / 4)``.
    """
    height, width = image_size
    grid = (math.ceil(height / IRN_STRIDE), math.ceil(width / IRN_STRIDE))
    if tuple(boundary.shape) != grid or tuple(cams.shape[1:]) != grid or cams.shape[0] != len(keys):
        raise ValueError(
            f"expected boundary {grid} and cams ({len(keys)}, {grid[0]}, {grid[1]}) on the stride-4 grid of "
            f"a {height}x{width} image, got {tuple(boundary.shape)} and {tuple(cams.shape)} (the CAM files' "
            f"'cam' maps need make_cam.low_res_stride={IRN_STRIDE})"
        )
    if len(keys) == 0:
        return np.zeros((height, width), dtype=np.uint8)
    offsets = pair_offsets(radius)
    affinity = boundary_affinities(boundary[None].float(), offsets)[0]
    walked = random_walk(cams.float() * (1.0 - boundary.float()), transition_matrix(affinity, offsets, beta),
                         2**exponent)  # fmt: skip
    upsampled = F.interpolate(walked[None], scale_factor=IRN_STRIDE, mode="bilinear", align_corners=False)
    scores = upsampled[0, :, :height, :width]
    peak = scores.max()
    scores = scores / peak if peak > 0 else torch.zeros_like(scores)
    scores = torch.cat([torch.full_like(scores[:1], background_threshold), scores])
    class_of_channel = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    labels: np.ndarray = class_of_channel[scores.argmax(dim=0).cpu().numpy()]
    return labels.astype(np.uint8)
