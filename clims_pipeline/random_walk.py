"""PSA (Ahn & Kwak, CVPR 2018): AffinityNet, its affinity labels, and random-walk propagation of CAMs.

Notation: an image padded to a multiple of 8 gives a feature grid of ``h x w = H/8 x W/8`` nodes (``n``).
Pairs join a node ``p`` to ``p + o`` for every offset ``o`` of :func:`pair_offsets` (a half disc of radius
``r``, so each unordered pair appears once; PSA uses ``r = 5``).

1. Affinity labels (:func:`confident_label_map`, :func:`affinity_label_masks`): CAMs with a background score
   ``(1 - max_k CAM_k)^alpha`` are refined by a dense CRF twice. A low ``alpha`` (4) inflates the background,
   so the foreground that survives is confident; a high ``alpha`` (32) shrinks it, so the background that
   survives is confident; everything in between is ignored (255). Two nodes of a pair with the same confident
   label are a positive pair (background-background or foreground-foreground); different labels a negative.
2. AffinityNet (:class:`AffinityNet`) maps an image to features ``f`` at stride 8; a pair's affinity is
   ``a(p, q) = exp(-mean_c |f_c(p) - f_c(q)|)``. Loss (:func:`affinity_loss`): ``L = L_bg/4 + L_fg/4 +
   L_neg/2``, each a mean cross-entropy over its pairs.
3. Random walk (:func:`transition_matrix`, :func:`random_walk`): ``A = a^beta`` (``a(p, p) = 1``), the
   row-stochastic ``T = D^-1 A`` with ``D = diag(A 1)``, and the CAMs (background channel included) are
   propagated ``2^t`` times, ``vec(M) <- T vec(M)``; the pseudo label is the arg-max.

PSA's defaults are ``beta = 8``, ``t = 8`` (256 steps), inference ``alpha = 16``; the CLIMS camera-ready run
used ``beta = 10``, ``t = 8``. Instead of squaring the dense ``n x n`` matrix ``t`` times (O(n^3) each, fine
on a GPU for small images), ``T`` is kept sparse and applied ``2^t`` times: the same result in O(2^t * n * P)
with ``P`` the pairs per node, which is what makes CPU runs possible.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import MakeRWConfig
from .crf import PSA_CRF, CRFParams, dense_crf
from .distributed import all_reduce_sum
from .networks import fetch_imagenet_state, freeze_batchnorm_statistics, load_backbone_state

IGNORE_LABEL = 255
FEATURE_STRIDE = 8


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` of the pairs within ``radius`` (Euclidean, strictly less), one per unordered pair:
    ``dy = 0, dx > 0`` and ``dy > 0`` with any ``dx``."""
    if radius < 2:
        raise ValueError(f"expected radius >= 2 (at least the 4-neighbours), got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [
        (dy, dx)
        for dy in range(1, radius)
        for dx in range(-radius + 1, radius)
        if dx * dx + dy * dy < radius * radius
    ]
    return offsets


def pair_windows(height: int, width: int, offset: tuple[int, int]) -> tuple[tuple[slice, slice], ...]:
    """(source window, target window): pixel ``p`` of the source window pairs with the same position of the
    target window, ``p + offset``. Empty when the offset leaves the grid."""
    dy, dx = offset
    x_start, x_stop = max(0, -dx), min(width, width - dx)
    source = (slice(0, max(height - dy, 0)), slice(x_start, max(x_stop, x_start)))
    target = (slice(dy, dy + source[0].stop), slice(x_start + dx, x_start + dx + source[1].stop - x_start))
    return source, target


def pair_affinities(features: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """features (B, C, h, w) -> affinities (B, O, h, w): ``exp(-mean_c |f(p) - f(p + o)|)`` for every offset;
    0 where ``p + o`` is outside the grid (such pairs carry no label)."""
    if features.ndim != 4:
        raise ValueError(f"expected features of shape (B, C, h, w), got {tuple(features.shape)}")
    batch, _, height, width = features.shape
    out = features.new_zeros(batch, len(offsets), height, width)
    for index, offset in enumerate(offsets):
        (sy, sx), (ty, tx) = pair_windows(height, width, offset)
        difference = (features[:, :, sy, sx] - features[:, :, ty, tx]).abs().mean(dim=1)
        out[:, index, sy, sx] = torch.exp(-difference)
    return out


def affinity_label_masks(
    labels: torch.Tensor, offsets: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels (B, h, w): 0 confident background, 1..K confident class, 255 ignored.

    Returns float masks (B, O, h, w) of background-positive pairs (both 0), foreground-positive pairs (same
    class) and negative pairs (two different confident labels); pairs with an ignored node are in none.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected labels of shape (B, h, w), got {tuple(labels.shape)}")
    labels = labels.long()
    batch, height, width = labels.shape
    masks = torch.zeros(3, batch, len(offsets), height, width, device=labels.device)
    for index, offset in enumerate(offsets):
        (sy, sx), (ty, tx) = pair_windows(height, width, offset)
        source, target = labels[:, sy, sx], labels[:, ty, tx]
        valid = (source != IGNORE_LABEL) & (target != IGNORE_LABEL)
        same = source == target
        masks[0, :, index, sy, sx] = (valid & same & (source == 0)).float()
        masks[1, :, index, sy, sx] = (valid & same & (source != 0)).float()
        masks[2, :, index, sy, sx] = (valid & ~same).float()
    return masks[0], masks[1], masks[2]


def affinity_loss(
    affinities: torch.Tensor, labels: torch.Tensor, offsets: list[tuple[int, int]], world_size: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PSA's loss ``L_bg/4 + L_fg/4 + L_neg/2``; each term is a cross-entropy averaged over its pairs.

    affinities (B, O, h, w) in (0, 1]; labels (B, h, w) as in :func:`affinity_label_masks`. With
    ``world_size`` > 1 (one rank of a DDP step) each term averages over the pairs of *all* ranks' batches
    (one all-reduce of the three pair counts) times ``world_size``: the ranks hold different numbers of
    pairs, and DDP's average of the ranks' gradients then equals the gradient of one process on the whole
    global batch (the logged parts, averaged over the ranks, are the global means too).
    """
    if affinities.shape[2:] != labels.shape[1:] or affinities.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected affinities (B, O, h, w) and labels (B, h, w) on the same grid, got "
            f"{tuple(affinities.shape)} and {tuple(labels.shape)}"
        )
    losses = relation_losses(affinities, affinity_label_masks(labels, offsets), world_size)
    background_loss, foreground_loss, negative_loss = losses["bg"], losses["fg"], losses["neg"]
    loss = background_loss / 4 + foreground_loss / 4 + negative_loss / 2
    return loss, losses


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 (autocast) as float32 for a loss; float32 and float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


#: Keeps log finite at affinity 0 or 1, and the means of empty pair sets at 0.
PAIR_EPS = 1e-5


def pair_counts(masks: tuple[torch.Tensor, ...], world_size: int = 1) -> torch.Tensor:
    """The number of pairs in each mask, summed over the ranks when ``world_size`` > 1 (one all-reduce)."""
    counts = torch.stack([mask.sum() for mask in masks])
    return all_reduce_sum(counts.detach().clone()) if world_size > 1 else counts


def relation_losses(
    affinities: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor], world_size: int = 1
) -> dict[str, torch.Tensor]:
    """The three cross-entropies of an affinity map (B, O, h, w) against the (background-positive,
    foreground-positive, negative) pair masks of :func:`affinity_label_masks`, each averaged over its pairs
    of the global batch (times ``world_size``: see :func:`affinity_loss`). Shared by PSA and IRNet."""
    affinities = at_least_float32(affinities)
    counts = pair_counts(masks, world_size)
    values = (-torch.log(affinities + PAIR_EPS), -torch.log(affinities + PAIR_EPS),
              -torch.log(1.0 + PAIR_EPS - affinities))  # fmt: skip
    return {
        name: (mask * value).sum() * world_size / (count + PAIR_EPS)
        for name, mask, value, count in zip(("bg", "fg", "neg"), masks, values, counts, strict=True)
    }


# ------------------------------------------------------------------------------------------------------
# affinity labels from CAMs


def background_scores(cams: np.ndarray, power: float) -> np.ndarray:
    """(n, H, W) CAMs in [0, 1] -> (1 + n, H, W): PSA's background ``(1 - max_k CAM_k)^power`` first."""
    peak = cams.max(axis=0) if len(cams) else np.zeros(cams.shape[1:], dtype=np.float32)
    background = np.power(np.clip(1.0 - peak, 0.0, 1.0), power)
    return np.concatenate([background[None], cams], axis=0).astype(np.float32)


def confident_label_map(
    image: np.ndarray,
    cams: np.ndarray,
    keys: np.ndarray,
    low_power: float = 4.0,
    high_power: float = 32.0,
    crf: CRFParams | None = PSA_CRF,
) -> np.ndarray:
    """The affinity label map (H, W) uint8 of one image: 0 confident background, ``k + 1`` confident class
    ``keys[i] = k``, 255 ignored.

    image (H, W, 3) uint8; cams (n, H, W) in [0, 1] for the image's ``n`` positive classes ``keys`` (0-based).
    ``crf=None`` skips the CRF (an arg-max of the raw scores; for tests and CRF-less machines).
    """
    if cams.shape[0] != len(keys):
        raise ValueError(f"expected one CAM per key, got {cams.shape[0]} CAMs and {len(keys)} keys")
    class_of_channel = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])

    def refined_argmax(power: float) -> np.ndarray:
        scores = background_scores(cams, power)
        if crf is not None:
            scores = dense_crf(image, scores, crf)
        labels: np.ndarray = class_of_channel[scores.argmax(axis=0)]
        return labels

    low = refined_argmax(low_power)  # background inflated: the surviving foreground is confident
    high = refined_argmax(high_power)  # background shrunk: the surviving background is confident
    label = np.where(low == 0, IGNORE_LABEL, low)
    label[high == 0] = 0
    return label.astype(np.uint8)


def downsample_labels(labels: torch.Tensor, stride: int, num_labels: int) -> torch.Tensor:
    """(B, H, W) labels (255 ignored) -> (B, H/stride, W/stride): each block's most frequent label, ignored
    labels included (so a block mostly outside the image or undecided stays ignored).

    PSA average-pools its CRF score maps by 8 and takes the arg-max; on label maps that is the block's mode.
    """
    _, height, width = labels.shape
    if height % stride or width % stride:
        raise ValueError(f"expected label maps divisible by {stride}, got {height}x{width}")
    index = labels.long().clone()
    index[index == IGNORE_LABEL] = num_labels  # an extra channel for "ignored"
    one_hot = F.one_hot(index, num_labels + 1).permute(0, 3, 1, 2).float()
    counts = F.avg_pool2d(one_hot, stride)
    mode = counts.argmax(dim=1)
    mode[mode == num_labels] = IGNORE_LABEL
    return mode


# ------------------------------------------------------------------------------------------------------
# the network


class _LevelBackbone(nn.Module):
    """A stem, then levels whose outputs AffinityNet reads; subclasses build ``stem`` and ``levels``."""

    stem: nn.Module
    levels: nn.ModuleList
    level_channels: tuple[int, int, int]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return outputs


class _TinyBackbone(_LevelBackbone):
    """Strided conv blocks to ``stride`` (8 or 4) and two more at that stride, for tests, smoke runs and
    small images (a 64-pixel image is an 8 x 8 grid at stride 8, 16 x 16 at stride 4)."""

    level_channels = (16, 24, 32)

    def __init__(self, stride: int = FEATURE_STRIDE) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"the tiny AffinityNet backbone has stride 4 or 8, got feature_stride={stride}")

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.stem = nn.Sequential(block(3, 8, 2), block(8, 16, 2))
        self.levels = nn.ModuleList([block(16, 16, stride // 4), block(16, 24, 1), block(24, 32, 1)])


class _ResNet50Stride8Backbone(_LevelBackbone):
    """torchvision ResNet-50 with dilated ``layer3``/``layer4`` (output stride 8); it returns the outputs of
    ``layer2``, ``layer3`` and ``layer4``, the three levels PSA's AffinityNet reads (there of ResNet-38)."""

    level_channels = (512, 1024, 2048)

    def __init__(self, weights: str) -> None:
        super().__init__()
        import torchvision

        model = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        if weights == "imagenet":
            state = fetch_imagenet_state(
                torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                "pass a local file with --set train_aff.weights=/path/to/resnet50.pth (or 'none')",
            )
            model.load_state_dict(state)
        elif weights != "none":
            load_backbone_state(model, Path(weights))
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
        self.levels = nn.ModuleList([model.layer2, model.layer3, model.layer4])
        # PSA keeps its first blocks fixed; here the stem and layer1 (generic low-level filters).
        for parameter in self.stem.parameters():
            parameter.requires_grad_(False)


class AffinityNet(nn.Module):
    """Backbone levels -> 1x1 convs (64, 128, 256 channels, ELU) -> concatenation -> 1x1 conv (448, ELU).

    ``forward`` returns the affinity features (B, 448, H/s, W/s) of images whose sides are multiples of the
    output stride ``s = stride`` (8 as PSA; the tiny backbone also has 4). ``widths`` sets the three reduced
    widths, 64/128/256 as PSA; tiny test networks use narrower ones. BatchNorm statistics stay frozen
    (batches of 8 crops are too small to re-estimate them).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str = "imagenet",
        widths: tuple[int, int, int] = (64, 128, 256),
        stride: int = FEATURE_STRIDE,
    ):
        super().__init__()
        self.stride = stride
        if backbone == "resnet50":
            if stride != FEATURE_STRIDE:
                raise ValueError(f"the resnet50 AffinityNet has output stride 8, got feature_stride={stride}")
            self.backbone: _LevelBackbone = _ResNet50Stride8Backbone(weights)
        elif backbone == "tiny":
            if weights != "none":
                raise ValueError(f"the tiny backbone has no pretrained weights, got {weights!r}")
            self.backbone = _TinyBackbone(stride)
        else:
            raise ValueError(f"expected backbone 'resnet50' or 'tiny', got {backbone!r}")
        self.feature_channels = sum(widths)
        reducers = [
            nn.Conv2d(cin, cout, 1, bias=False)
            for cin, cout in zip(self.backbone.level_channels, widths, strict=True)
        ]
        self.reducers = nn.ModuleList(reducers)
        self.fuse = nn.Conv2d(sum(widths), self.feature_channels, 1, bias=False)
        for reducer in reducers:
            nn.init.kaiming_normal_(reducer.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)  # PSA's init: a wide spread of initial affinities

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        freeze_batchnorm_statistics(self)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(f"expected image sides divisible by {self.stride}, got {height}x{width}")
        levels = self.backbone(images)
        reduced = [F.elu(reducer(level)) for reducer, level in zip(self.reducers, levels, strict=True)]
        return F.elu(self.fuse(torch.cat(reduced, dim=1)))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained backbone parameters, new head parameters), trainable ones only."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for module in (self.reducers, self.fuse) for p in module.parameters() if p.requires_grad]
        return backbone, head


# ------------------------------------------------------------------------------------------------------
# random walk


def transition_matrix(
    pair_affinity: torch.Tensor, offsets: list[tuple[int, int]], beta: float
) -> torch.Tensor:
    """The row-stochastic transition matrix ``T = D^-1 A`` (n, n), sparse (CSR), float64.

    pair_affinity (O, h, w): ``a(p, p + o)`` as from :func:`pair_affinities` (entries outside the grid are
    ignored). ``A`` is symmetric with ``A[p, p + o] = A[p + o, p] = a^beta`` and ``A[p, p] = 1``.
    """
    if pair_affinity.ndim != 3 or pair_affinity.shape[0] != len(offsets):
        raise ValueError(
            f"expected pair_affinity of shape ({len(offsets)}, h, w) for {len(offsets)} offsets, got "
            f"{tuple(pair_affinity.shape)}"
        )
    _, height, width = pair_affinity.shape
    device = pair_affinity.device
    node = torch.arange(height * width, device=device).view(height, width)
    rows, cols, values = [node.flatten()], [node.flatten()], [torch.ones(height * width, device=device)]
    for index, offset in enumerate(offsets):
        (sy, sx), (ty, tx) = pair_windows(height, width, offset)
        source, target = node[sy, sx].flatten(), node[ty, tx].flatten()
        weight = pair_affinity[index, sy, sx].flatten().double().clamp_min(0.0) ** beta
        rows += [source, target]
        cols += [target, source]
        values += [weight, weight]
    row, col = torch.cat(rows), torch.cat(cols)
    value = torch.cat([v.double() for v in values])
    degree = torch.zeros(height * width, dtype=torch.float64, device=device).index_add_(0, row, value)
    matrix = torch.sparse_coo_tensor(
        torch.stack([row, col]), value / degree[row], (height * width, height * width), check_invariants=False
    )
    with (
        warnings.catch_warnings()
    ):  # "sparse CSR support is in beta": the few operations used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return matrix.coalesce().to_sparse_csr()


def random_walk(scores: torch.Tensor, transition: torch.Tensor, steps: int) -> torch.Tensor:
    """Propagate score maps (C, h, w) ``steps`` times: ``vec(M_c) <- T vec(M_c)`` for every channel.

    ``steps = 2^t`` reproduces PSA's ``T^(2^t)`` (which it gets by squaring ``T`` ``t`` times).
    """
    channels, height, width = scores.shape
    if transition.shape != (height * width, height * width):
        raise ValueError(
            f"expected a ({height * width}, {height * width}) transition matrix for a {height}x{width} grid, "
            f"got {tuple(transition.shape)}"
        )
    if transition.device.type == "cpu":
        # scipy's CSR product is several times faster than torch's on CPU; the arithmetic is the same.
        import scipy.sparse

        matrix = scipy.sparse.csr_matrix(
            (
                transition.values().numpy(),
                transition.col_indices().numpy(),
                transition.crow_indices().numpy(),
            ),
            shape=tuple(transition.shape),
        )
        array = scores.reshape(channels, -1).t().double().numpy().copy()
        for _ in range(steps):
            array = matrix @ array
        return torch.from_numpy(array).t().reshape(channels, height, width).to(scores.dtype)
    vectors = scores.reshape(channels, -1).t().to(transition.dtype).contiguous()
    for _ in range(steps):
        vectors = transition @ vectors
    return vectors.t().reshape(channels, height, width).to(scores.dtype)


def pad_to_stride(tensor: torch.Tensor, stride: int = FEATURE_STRIDE) -> torch.Tensor:
    """Zero-pad the last two dimensions on the bottom/right to multiples of ``stride`` (PSA's geometry)."""
    height, width = tensor.shape[-2:]
    return F.pad(
        tensor,
        (0, math.ceil(width / stride) * stride - width, 0, math.ceil(height / stride) * stride - height),
    )


@torch.no_grad()
def refine_cams_with_random_walk(
    features: torch.Tensor,
    scores: torch.Tensor,
    radius: int,
    beta: float,
    exponent: int,
    stride: int = FEATURE_STRIDE,
) -> torch.Tensor:
    """One image: AffinityNet features (C, h, w) of the padded image and full-resolution scores (S, H, W)
    (background first) -> propagated scores (S, H, W).

    The scores are padded to the feature grid times ``stride``, average-pooled by ``stride``, walked
    ``2^exponent`` steps, and upsampled back (bilinear) and cropped, as PSA does (stride 8).
    """
    height, width = scores.shape[-2:]
    padded = pad_to_stride(scores[None].float(), stride)
    if padded.shape[-2:] != (features.shape[-2] * stride, features.shape[-1] * stride):
        raise ValueError(
            f"features {tuple(features.shape)} do not cover scores {tuple(scores.shape)} at stride {stride}"
        )
    pooled = F.avg_pool2d(padded, stride)[0]
    offsets = pair_offsets(radius)
    affinity = pair_affinities(features[None].float(), offsets)[0]
    walked = random_walk(pooled, transition_matrix(affinity, offsets, beta), 2**exponent)
    upsampled = F.interpolate(walked[None], size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return upsampled[0, :, :height, :width]


def random_walk_labels(
    image: np.ndarray,
    cams: np.ndarray,
    keys: np.ndarray,
    features: torch.Tensor,
    config: MakeRWConfig,
    stride: int = FEATURE_STRIDE,
) -> np.ndarray:
    """One image's pseudo mask (H, W) uint8 (0 background, ``k + 1`` class ``k``): the CAMs with PSA's
    background score, walked with the affinities of ``features`` (C, h, w) (AffinityNet's, or any others such
    as :func:`ground_truth_affinity_features`), optionally refined by the dense CRF, then the arg-max.

    image (H, W, 3) uint8; cams (n, H, W) in [0, 1] for the image's positive classes ``keys`` (0-based).
    """
    scores = torch.from_numpy(background_scores(cams, config.background_power)).to(features.device)
    walked = refine_cams_with_random_walk(
        features, scores, config.radius, config.beta, config.exponent, stride
    )
    walked_scores = walked.clamp_min(0).cpu().numpy()
    if config.crf and len(keys):
        walked_scores = dense_crf(image, walked_scores, PSA_CRF)
    class_of_channel = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    labels: np.ndarray = class_of_channel[walked_scores.argmax(axis=0)].astype(np.uint8)
    return labels


def build_affinity_net(backbone: str, weights: str, stride: int = FEATURE_STRIDE) -> AffinityNet:
    """AffinityNet on ``backbone`` ("resnet50": PSA's widths 64/128/256; otherwise small widths 8/8/16) with
    output stride ``stride``."""
    widths = (64, 128, 256) if backbone == "resnet50" else (8, 8, 16)
    return AffinityNet(backbone, weights, widths=widths, stride=stride)


def ground_truth_affinity_features(
    mask: np.ndarray, num_labels: int, stride: int = FEATURE_STRIDE, contrast: float = 5.0
) -> torch.Tensor:
    """Features (num_labels, h, w) whose :func:`pair_affinities` are the ground truth's: for an oracle check
    of the random walk (the walk with the best affinities the grid allows).

    mask (H, W) with labels 0..num_labels-1 and 255 void. Each node holds its block's label fractions (void
    pixels left out) times ``contrast * num_labels``, so two pure blocks of one label have affinity 1 and of
    two labels ``exp(-2 * contrast)``; mixed boundary blocks lie in between.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a mask of shape (H, W), got {mask.shape}")
    labels = torch.from_numpy(mask.astype(np.int64))
    valid = labels != IGNORE_LABEL
    if valid.any() and int(labels[valid].max()) >= num_labels:
        raise ValueError(
            f"expected mask labels < num_labels={num_labels} or 255, got {int(labels[valid].max())}"
        )
    one_hot = F.one_hot(torch.where(valid, labels, 0), num_labels).permute(2, 0, 1).float()
    one_hot = pad_to_stride((one_hot * valid.float())[None], stride)
    fractions = F.avg_pool2d(one_hot, stride)[0]
    fractions = fractions / fractions.sum(dim=0, keepdim=True).clamp_min(1e-6)
    return fractions * (contrast * num_labels)
