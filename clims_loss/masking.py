"""The fused, batched masking path: positive (image, class) pairs -> foreground and background views.

For every positive pair ``(b, k)`` CLIMS shows CLIP the image masked by the class's map,
``X * P_k`` (foreground), and by its complement, ``X * (1 - P_k)`` (background). The reference code
builds these views in a Python loop over pairs; here it is one gather of the pairs, one resize and
one broadcast multiply-add, whatever the number of pairs.

Two input conventions:

* ``mode="pixel"`` (default): the caller's normalisation (``image_mean``/``image_std``) is undone,
  the masking happens on pixel values in ``[0, 1]`` (masked-out pixels are black), and CLIP's own
  normalisation (``clip_mean``/``clip_std``) is applied. This is what CLIP saw in training.
* ``mode="pass_through"``: the caller's normalised image is masked as it is (masked-out pixels are
  0 in normalised space) and fed to CLIP without re-normalisation, resized with
  ``bilinear, align_corners=True``. This reproduces the official improved code's inputs exactly.

Both are the same affine map ``view = scale * X_resized * M + shift`` with ``M`` in ``{P, 1 - P}``,
which is how they are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from clims_loss._validation import (
    PendingChecks,
    ValueCheck,
    binary_check,
    check_bool,
    check_channels,
    check_choice,
    check_floating,
    check_map_size,
    check_maps_and_labels,
    check_positive_int,
    check_rank,
    check_same_device,
    check_tensor,
    compute_dtype,
    finite_check,
    index_range_check,
    positive_check,
    unit_interval_check,
)
from clims_loss.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

MASKING_MODES = ("pixel", "pass_through")

__all__ = ["MaskedViews", "check_evaluator_inputs", "masked_views", "positive_pairs"]


@dataclass(frozen=True)
class MaskedViews:
    """The views of ``N`` positive pairs, foreground first: ``views[:N]`` fg, ``views[N:]`` bg.

    Keeping both halves in one ``(2N, 3, S, S)`` tensor lets the encoder see them in one call.
    """

    views: Tensor
    batch_index: Tensor
    class_index: Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.batch_index.shape[0])

    @property
    def fg(self) -> Tensor:
        """``(N, 3, S, S)`` views ``X * P_k``."""
        return self.views[: self.num_pairs]

    @property
    def bg(self) -> Tensor:
        """``(N, 3, S, S)`` views ``X * (1 - P_k)``."""
        return self.views[self.num_pairs :]


def positive_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(batch_index, class_index)``, each ``(N,)``, of the non-zero entries of ``(B, K)`` labels.

    This is the only host-device synchronisation of the masking path: ``N`` must be known.

    >>> positive_pairs(torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    (tensor([0, 0, 1]), tensor([1, 2, 0]))
    """
    batch_index, class_index = labels.nonzero(as_tuple=True)
    return batch_index, class_index


def check_evaluator_inputs(
    images: object, cams: object, labels: object, *, validate: bool, extra: Sequence[ValueCheck] = ()
) -> PendingChecks:
    """Check shapes, dtypes and devices now; return the value checks (NaN, ranges) to read later.

    ``extra`` value checks join the same pending read (one host-device sync for all).
    """
    images = check_tensor("images", images)
    check_rank("images", images, 4, "(B, 3, H, W)")
    if images.shape[1] != 3:
        raise ValueError(
            f"expected images of shape (B, 3, H, W) with 3 RGB channels, got {tuple(images.shape)}"
        )
    check_floating("images", images)
    check_map_size("images", images, "(B, 3, H, W)")
    cams, labels = check_maps_and_labels(cams, labels)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected images of shape (B, 3, H, W) with B = {labels.shape[0]} as labels, "
            f"got {tuple(images.shape)}"
        )
    check_same_device(images=images, cams=cams, labels=labels)
    if not validate:
        return PendingChecks([])
    return PendingChecks(
        [
            finite_check("images", images),
            finite_check("cams", cams),
            unit_interval_check("cams", cams),
            binary_check("labels", labels),
            *extra,
        ]
    )


def _channel_vector(values: Sequence[float] | Tensor, name: str, like: Tensor) -> Tensor:
    vector = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return vector.view(1, 3, 1, 1)


def _check_channel_settings(
    named: Sequence[tuple[str, Sequence[float] | Tensor, bool]], validate: bool
) -> list[ValueCheck]:
    """Per-channel means and stds: Python values are checked now; tensors by shape now and by value
    with the other pending checks (no extra sync), only when ``validate``."""
    pending: list[ValueCheck] = []
    for name, values, positive in named:
        if not isinstance(values, Tensor):
            check_channels(name, values, positive=positive)
            continue
        if values.shape != (3,):
            raise ValueError(f"expected {name} to hold 3 per-channel values, got shape {tuple(values.shape)}")
        if validate:
            pending.append(finite_check(name, values))
            if positive:
                pending.append(positive_check(name, values))
    return pending


def _check_pairs(
    pairs: object, labels: Tensor, validate: bool
) -> tuple[tuple[Tensor, Tensor], list[ValueCheck]]:
    if not isinstance(pairs, tuple) or len(pairs) != 2:
        raise TypeError(
            "expected pairs to be a (batch_index, class_index) tuple of two tensors, "
            f"got {type(pairs).__name__}"
        )
    batch_index, class_index = (check_tensor(f"pairs[{i}]", t) for i, t in enumerate(pairs))
    for i, index in enumerate((batch_index, class_index)):
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"expected pairs[{i}] to be a 1-d int64 tensor of shape (N,), "
                f"got {index.dtype} of shape {tuple(index.shape)}"
            )
    if batch_index.shape != class_index.shape:
        raise ValueError(
            f"expected pairs of equal length (N,), got batch_index {tuple(batch_index.shape)} and "
            f"class_index {tuple(class_index.shape)}"
        )
    check_same_device(labels=labels, batch_index=batch_index, class_index=class_index)
    checks: list[ValueCheck] = []
    if validate and batch_index.numel() > 0:
        checks.append(index_range_check("pairs[0] (batch_index)", batch_index, labels.shape[0]))
        checks.append(index_range_check("pairs[1] (class_index)", class_index, labels.shape[1]))
    return (batch_index, class_index), checks


def masked_views(
    images: Tensor,
    cams: Tensor,
    labels: Tensor,
    *,
    size: int = 224,
    mode: str = "pixel",
    image_mean: Sequence[float] | Tensor = IMAGENET_MEAN,
    image_std: Sequence[float] | Tensor = IMAGENET_STD,
    clip_mean: Sequence[float] | Tensor = CLIP_MEAN,
    clip_std: Sequence[float] | Tensor = CLIP_STD,
    pairs: tuple[Tensor, Tensor] | None = None,
    validate: bool = True,
) -> MaskedViews:
    """Foreground and background views of the positive pairs at CLIP's input size.

    Args:
        images: ``(B, 3, H, W)`` images, normalised with ``image_mean``/``image_std``.
        cams: ``(B, K, h, w)`` maps in ``[0, 1]``, any resolution (resized bilinearly to ``size``).
        labels: ``(B, K)`` multi-hot labels; their non-zero entries are the positive pairs.
        size: CLIP's input side ``S``.
        mode: ``"pixel"`` or ``"pass_through"`` (see the module docs).
        image_mean: per-channel mean of the normalisation of ``images`` (ignored by ``"pass_through"``).
        image_std: per-channel std of the normalisation of ``images`` (ignored by ``"pass_through"``).
        clip_mean: CLIP's input mean (ignored by ``"pass_through"``).
        clip_std: CLIP's input std (ignored by ``"pass_through"``).
        pairs: precomputed `positive_pairs` of ``labels``, to skip finding them again: two 1-d
            integer tensors of equal length, indices into ``B`` and ``K`` (range-checked when
            ``validate``).
        validate: check for NaN, maps outside ``[0, 1]`` (up to a rounding tolerance of
            ``max(1e-6, torch.finfo(cams.dtype).eps)``), non-binary labels and out-of-range ``pairs``,
            in one host-device sync.

    Returns:
        `MaskedViews` with ``views`` of shape ``(2N, 3, S, S)`` and the pairs' indices; the views'
        dtype is ``promote_types(images.dtype, cams.dtype, float32)``.

    >>> images = torch.zeros(2, 3, 32, 32)
    >>> cams = torch.rand(2, 4, 8, 8)
    >>> labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    >>> out = masked_views(images, cams, labels, size=16)
    >>> out.views.shape, out.class_index.tolist()
    (torch.Size([6, 3, 16, 16]), [0, 3, 1])
    """
    check_choice("mode", mode, MASKING_MODES)
    check_positive_int("size", size)
    check_bool("validate", validate)
    channel_checks = _check_channel_settings(
        [
            ("image_mean", image_mean, False),
            ("image_std", image_std, True),
            ("clip_mean", clip_mean, False),
            ("clip_std", clip_std, True),
        ],
        validate,
    )
    labels = check_tensor("labels", labels)
    pair_checks: list[ValueCheck] = []
    if pairs is not None:
        pairs, pair_checks = _check_pairs(pairs, labels, validate)
    pending = check_evaluator_inputs(
        images, cams, labels, validate=validate, extra=channel_checks + pair_checks
    )
    batch_index, class_index = positive_pairs(labels) if pairs is None else pairs
    pending.raise_if_failed()

    # At least float32: half-precision resizing is missing on CPU and would round the masks coarsely.
    dtype = compute_dtype(images.dtype, cams.dtype)
    images = images.to(dtype)
    pair_maps = cams[batch_index, class_index].unsqueeze(1).to(dtype)  # (N, 1, h, w)

    if mode == "pixel":
        # Undo the caller's normalisation and apply CLIP's in one affine map: x_clip = a * x + c.
        mean_in = _channel_vector(image_mean, "image_mean", images)
        std_in = _channel_vector(image_std, "image_std", images)
        mean_clip = _channel_vector(clip_mean, "clip_mean", images)
        std_clip = _channel_vector(clip_std, "clip_std", images)
        downsampling = images.shape[-2] > size or images.shape[-1] > size
        resized = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=downsampling
        )
        pixels_over_std = (resized * std_in + mean_in) / std_clip
        shift = -mean_clip / std_clip
        map_align_corners = False
    else:
        pixels_over_std = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
        shift = torch.zeros(1, 3, 1, 1, dtype=dtype, device=images.device)
        map_align_corners = True

    pair_maps = F.interpolate(pair_maps, size=(size, size), mode="bilinear", align_corners=map_align_corners)
    masks = torch.stack((pair_maps, 1.0 - pair_maps))  # (2, N, 1, S, S)
    views = torch.addcmul(shift, masks, pixels_over_std[batch_index])
    return MaskedViews(rearrange(views, "two n c h w -> (two n) c h w"), batch_index, class_index)
