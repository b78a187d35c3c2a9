"""Collapse: when a class's maps have died (or spread over everything), defined once.

CLIMS's CLIP terms can be satisfied by a degenerate map: when CLIP scores an empty view as high for a
class as the object, OTM is happy with a map of zeros; when the object-removed view scores as high as the
object view, BTM and CBS push the map to nothing. Such a class's maps *collapse*. This module is the one
definition of it, used by the training alarm of the pipeline, the validation of the CLIP readiness report
(`clims_loss.clip_readiness`) and the tests.

For ``(B, K, h, w)`` maps in ``[0, 1]`` and ``(B, K)`` multi-hot labels, a map's *activation* is its
spatial mean. Per class ``k``:

* ``positive_mean[k]``: the mean activation of the maps of ``k`` on the images that contain ``k``;
* ``negative_mean[k]``: the mean activation of the maps of ``k`` on the images that do not.

Class ``k`` has **collapsed** when

* it has *vanished*: ``positive_mean[k] < fraction * reference[k]``, where ``reference[k]`` is the
  baseline CAM network's ``positive_mean[k]`` measured the same way (``fraction`` defaults to
  `DEFAULT_COLLAPSE_FRACTION` = 0.25: a quarter of the baseline's activation), or
* it has *flooded*: ``negative_mean[k] > flood_level`` (defaults to `DEFAULT_FLOOD_LEVEL` = 0.6: on
  images without the class, its map is on average well over half on; a sigmoid map with no opinion,
  logit 0, sits at 0.5, which is therefore not enough), and, when the baseline's own
  ``negative_mean[k]`` is known, above that too (a baseline that floods already is no collapse of training).

A class without images containing it (or without images lacking it) gets no verdict of that kind: its
mean is NaN and the rule does not fire. Activations are accumulated as sums and counts
(`ClassActivation`), so that they can be added over steps and over processes before the means are taken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clims_loss._validation import (
    binary_check,
    check_maps_and_labels,
    check_real,
    check_same_device,
    check_strings,
    check_tensor,
    check_values,
    finite_check,
    unit_interval_check,
)

__all__ = [
    "DEFAULT_COLLAPSE_FRACTION",
    "DEFAULT_FLOOD_LEVEL",
    "ClassActivation",
    "CollapseCheck",
    "class_activation",
    "detect_collapse",
]

#: A class has vanished when its mean activation on its images falls below this fraction of the baseline's.
DEFAULT_COLLAPSE_FRACTION = 0.25
#: A class has flooded when its mean activation on images without it exceeds this level.
DEFAULT_FLOOD_LEVEL = 0.6


@dataclass(frozen=True)
class ClassActivation:
    """Per-class sums and counts of map activations (each ``(K,)``, float64), split by label.

    ``positive_sum[k]`` sums the spatial means of the maps of class ``k`` over the ``positive_count[k]``
    images that contain ``k``; ``negative_*`` the same over the images that do not. Add two with ``+``
    (e.g. over steps); take the means with `positive_mean` and `negative_mean`.
    """

    positive_sum: Tensor
    positive_count: Tensor
    negative_sum: Tensor
    negative_count: Tensor

    @property
    def num_classes(self) -> int:
        return int(self.positive_sum.shape[0])

    @property
    def positive_mean(self) -> Tensor:
        """``(K,)`` mean activation on the images containing each class; NaN where there are none."""
        return _mean(self.positive_sum, self.positive_count)

    @property
    def negative_mean(self) -> Tensor:
        """``(K,)`` mean activation on the images without each class; NaN where there are none."""
        return _mean(self.negative_sum, self.negative_count)

    def __add__(self, other: ClassActivation) -> ClassActivation:
        if not isinstance(other, ClassActivation):
            return NotImplemented
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"expected ClassActivation of {self.num_classes} classes, got one of {other.num_classes}"
            )
        return ClassActivation(
            *(a + b.to(a.device) for a, b in zip(self.as_tensor(), other.as_tensor(), strict=True))
        )

    def as_tensor(self) -> Tensor:
        """``(4, K)``: positive sum, positive count, negative sum, negative count (e.g. to all-reduce)."""
        return torch.stack([self.positive_sum, self.positive_count, self.negative_sum, self.negative_count])

    @classmethod
    def from_tensor(cls, stacked: Tensor) -> ClassActivation:
        """The inverse of `as_tensor`."""
        stacked = check_tensor("stacked", stacked)
        if stacked.dim() != 2 or stacked.shape[0] != 4:
            raise ValueError(f"expected stacked of shape (4, K), got {tuple(stacked.shape)}")
        return cls(*stacked.to(torch.float64).unbind(0))

    @classmethod
    def zeros(cls, num_classes: int, device: torch.device | str | None = None) -> ClassActivation:
        """Empty sums for ``num_classes`` classes (the start of an accumulation)."""
        return cls.from_tensor(torch.zeros(4, num_classes, dtype=torch.float64, device=device))


def _mean(total: Tensor, count: Tensor) -> Tensor:
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


@torch.no_grad()
def class_activation(cams: Tensor, labels: Tensor, *, validate: bool = True) -> ClassActivation:
    """Per-class activation sums of a batch of maps, split by the image labels.

    Args:
        cams: ``(B, K, h, w)`` maps in ``[0, 1]`` (e.g. the CLIMS network's sigmoid maps, or CAMs
            divided by their maximum), any floating dtype.
        labels: ``(B, K)`` multi-hot image labels.
        validate: check for NaN, maps outside ``[0, 1]`` and non-binary labels (one host-device sync).

    Returns:
        `ClassActivation` with float64 sums and counts on the maps' device (no gradient).

    >>> cams = torch.zeros(2, 2, 4, 4); cams[0, 0] = 1.0; cams[1, 1] = 0.5
    >>> activation = class_activation(cams, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> activation.positive_mean.tolist(), activation.negative_mean.tolist()
    ([1.0, 0.5], [0.0, 0.0])
    """
    cams, labels = check_maps_and_labels(cams, labels)
    check_same_device(cams=cams, labels=labels)
    if validate:
        check_values(
            [finite_check("cams", cams), unit_interval_check("cams", cams), binary_check("labels", labels)]
        )
    activation = cams.detach().to(torch.float64).mean(dim=(2, 3))  # (B, K)
    positive = labels.detach().to(torch.float64)
    negative = 1.0 - positive
    return ClassActivation(
        positive_sum=(activation * positive).sum(0),
        positive_count=positive.sum(0),
        negative_sum=(activation * negative).sum(0),
        negative_count=negative.sum(0),
    )


@dataclass(frozen=True)
class CollapseCheck:
    """The verdict of `detect_collapse`, per class (every field ``(K,)``, on the CPU).

    ``vanished``/``flooded`` say which rule fired; ``collapsed`` is either. ``positive_mean``,
    ``negative_mean``, ``reference`` and ``reference_negative`` are the values compared (NaN where not
    measured or not given).
    """

    vanished: Tensor
    flooded: Tensor
    positive_mean: Tensor
    negative_mean: Tensor
    reference: Tensor
    reference_negative: Tensor
    fraction: float
    flood_level: float

    @property
    def collapsed(self) -> Tensor:
        return self.vanished | self.flooded

    def collapsed_classes(self, class_names: Sequence[str]) -> list[str]:
        """The names of the collapsed classes, in class order."""
        names = self._names(class_names)
        return [name for name, hit in zip(names, self.collapsed.tolist(), strict=True) if hit]

    def messages(self, class_names: Sequence[str], classes: Sequence[int] | None = None) -> list[str]:
        """One sentence per rule that fired, naming the class, the rule and the values (only for the class
        indices ``classes`` when given)."""
        names = self._names(class_names)
        lines = []
        for k, name in enumerate(names):
            if classes is not None and k not in classes:
                continue
            if self.vanished[k]:
                lines.append(
                    f"class {name!r} collapsed: mean activation {float(self.positive_mean[k]):.4f} on the "
                    f"images that contain it, below {self.fraction:g} x the baseline's "
                    f"{float(self.reference[k]):.4f}"
                )
            if self.flooded[k]:
                baseline = float(self.reference_negative[k])
                lines.append(
                    f"class {name!r} floods: mean activation {float(self.negative_mean[k]):.4f} on the "
                    f"images without it, above {self.flood_level:g}"
                    + ("" if math.isnan(baseline) else f" and the baseline's {baseline:.4f}")
                )
        return lines

    def _names(self, class_names: Sequence[str]) -> tuple[str, ...]:
        names = check_strings("class_names", class_names)
        if len(names) != self.vanished.shape[0]:
            raise ValueError(f"expected {self.vanished.shape[0]} class_names, got {len(names)}")
        return names


def detect_collapse(
    activation: ClassActivation,
    reference: Tensor | Sequence[float] | ClassActivation,
    *,
    fraction: float = DEFAULT_COLLAPSE_FRACTION,
    flood_level: float | None = DEFAULT_FLOOD_LEVEL,
) -> CollapseCheck:
    """Apply the collapse rule (see the module docs) to measured activations.

    Args:
        activation: the maps under test, from `class_activation` (summed over any number of batches).
        reference: the baseline's ``(K,)`` mean activation on the images containing each class, or its
            `ClassActivation` (whose ``positive_mean`` is taken, and whose ``negative_mean`` the flooding
            rule must also exceed). NaN or ``0`` entries disable the vanishing rule for that class.
        fraction: vanished when ``positive_mean < fraction * reference``; in ``[0, 1]``.
        flood_level: flooded when ``negative_mean > flood_level``; in ``[0, 1]``, or ``None`` to skip
            the flooding rule.

    >>> measured = ClassActivation.from_tensor(torch.tensor([[0.01, 0.3], [1, 1], [0.0, 0.9], [1, 1]]))
    >>> check = detect_collapse(measured, [0.4, 0.4])
    >>> check.collapsed_classes(["boat", "car"])
    ['boat', 'car']
    >>> check.vanished.tolist(), check.flooded.tolist()
    ([True, False], [False, True])
    """
    if not isinstance(activation, ClassActivation):
        raise TypeError(f"expected activation to be a ClassActivation, got {type(activation).__name__}")
    fraction = check_real("fraction", fraction, minimum=0.0)
    if fraction > 1.0:
        raise ValueError(f"expected fraction in [0, 1], got {fraction!r}")
    if flood_level is not None:
        flood_level = check_real("flood_level", flood_level, minimum=0.0)
        if flood_level > 1.0:
            raise ValueError(f"expected flood_level in [0, 1] or None, got {flood_level!r}")
    reference_negative = torch.full((activation.num_classes,), math.nan, dtype=torch.float64)
    if isinstance(reference, ClassActivation):
        reference_mean = reference.positive_mean
        if reference.num_classes == activation.num_classes:
            reference_negative = reference.negative_mean.detach().to("cpu", torch.float64)
    elif isinstance(reference, Tensor):
        reference_mean = reference
    elif isinstance(reference, Sequence) and not isinstance(reference, (str, bytes)):
        reference_mean = torch.tensor([check_real(f"reference[{i}]", x) for i, x in enumerate(reference)])
    else:
        raise TypeError(
            f"expected reference to be a (K,) tensor, a sequence of floats or a ClassActivation, "
            f"got {type(reference).__name__}"
        )
    reference_mean = reference_mean.detach().to("cpu", torch.float64)
    if reference_mean.shape != (activation.num_classes,):
        raise ValueError(
            f"expected reference of shape (K,) = ({activation.num_classes},), "
            f"got {tuple(reference_mean.shape)}"
        )
    positive = activation.positive_mean.detach().to("cpu")
    negative = activation.negative_mean.detach().to("cpu")
    # Comparisons with NaN are False: an unmeasured class never collapses.
    vanished = (reference_mean > 0) & (positive < fraction * reference_mean)
    flooded = (
        (negative > flood_level) & ~(negative <= reference_negative)  # NaN baseline: the level alone
        if flood_level is not None
        else torch.zeros_like(negative, dtype=torch.bool)
    )
    return CollapseCheck(
        vanished=vanished,
        flooded=flooded,
        positive_mean=positive,
        negative_mean=negative,
        reference=reference_mean,
        reference_negative=reference_negative,
        fraction=fraction,
        flood_level=math.nan if flood_level is None else flood_level,
    )
