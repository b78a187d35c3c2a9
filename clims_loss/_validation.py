"""Input checks shared by the functional API and the evaluator.

Every check raises an exception that names the argument and says what was expected and what was
received, so a user can fix the call without reading the library's source.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")

CAM_TOLERANCE = 1e-6
"""Maps may leave ``[0, 1]`` by ``max(CAM_TOLERANCE, torch.finfo(dtype).eps)``: rounding, not an error."""


def unit_interval_tolerance(dtype: torch.dtype) -> float:
    """How far maps of ``dtype`` may lie outside ``[0, 1]``: 1e-6, or one rounding step of a half dtype.

    >>> unit_interval_tolerance(torch.float32), unit_interval_tolerance(torch.bfloat16)
    (1e-06, 0.0078125)
    """
    return max(CAM_TOLERANCE, float(torch.finfo(dtype).eps))


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the losses compute and return in: the inputs' promoted dtype, at least float32.

    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float32, torch.float64)
    (torch.float32, torch.float64)
    """
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


# ---------------------------------------------------------------------------------------------- settings
def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be a bool, got {_describe(value)}")
    return value


def check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected {name} to be a str, got {_describe(value)}")
    return value


def check_real(name: str, value: object, *, minimum: float | None = None) -> float:
    """``value`` as a finite Python float (``>= minimum`` when given); bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected {name} to be a real number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        bound = "" if minimum is None else f" and >= {minimum:g}"
        raise ValueError(f"expected {name} to be finite{bound}, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"expected {name} >= {minimum:g}, got {number!r}")
    return number


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"expected {name} to be a positive int, got {_describe(value)}")
    if int(value) < 1:
        raise ValueError(f"expected {name} to be a positive int, got {int(value)}")
    return int(value)


def check_strings(name: str, value: object) -> tuple[str, ...]:
    """A sequence of strings as a tuple; a single ``str`` is refused (it would become its letters)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"expected {name} to be a sequence of str (e.g. a tuple), got a single {type(value).__name__} "
            f"{value!r}; wrap it: ({value!r},)"
        )
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(f"expected {name} to be a sequence of str, got {_describe(value)}")
    items = tuple(value)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"expected {name}[{index}] to be a str, got {_describe(item)}")
    return items


def check_mapping(name: str, value: object) -> Mapping[object, object]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected {name} to be a mapping (dict), got {_describe(value)}")
    return value


def check_channels(name: str, values: object, *, positive: bool) -> tuple[float, float, float]:
    """Three finite per-channel values (``> 0`` when ``positive``: a std of 0 wipes a channel out)."""
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"expected {name} to hold 3 per-channel values, got {_describe(values)}")
    items = tuple(values)
    if len(items) != 3:
        raise ValueError(f"expected {name} to hold 3 per-channel values, got {len(items)}: {items!r}")
    numbers_ = tuple(check_real(f"{name}[{i}]", item) for i, item in enumerate(items))
    if positive and min(numbers_) <= 0:
        raise ValueError(f"expected {name} > 0 in every channel, got {numbers_!r}")
    return numbers_[0], numbers_[1], numbers_[2]


def check_eps(name: str, eps: object, dtype: torch.dtype | None = None) -> float:
    """``eps`` in ``(0, 0.5)``, and, for the ``dtype`` it meets, no smaller than ``torch.finfo(dtype).eps``.

    Below that, ``1 - eps`` rounds to ``1`` in ``dtype`` and ``log(1 - p)`` is ``-inf``.
    """
    value = check_real(name, eps)
    if not 0.0 < value < 0.5:
        raise ValueError(f"expected {name} in (0, 0.5), got {value!r}")
    if dtype is not None:
        smallest = float(torch.finfo(dtype).eps)
        if value < smallest:
            raise ValueError(
                f"expected {name} >= {smallest:.3g} (torch.finfo({dtype}).eps) for similarities clamped "
                f"in {dtype}, where a smaller eps rounds 1 - eps to 1 and log(1 - p) to -inf; got {value!r}"
            )
    return value


# ---------------------------------------------------------------------------------------------- tensors


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, value: Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"expected {name} to have a floating dtype, got {value.dtype}")


def check_rank(name: str, value: Tensor, rank: int, layout: str) -> None:
    if value.dim() != rank:
        raise ValueError(f"expected {name} of shape {layout}, got shape {tuple(value.shape)}")


def check_map_size(name: str, value: Tensor, layout: str = "(B, K, h, w)") -> None:
    """The two spatial sides of a 4-d tensor are at least 1 (an empty map has no mean)."""
    if value.shape[-2] < 1 or value.shape[-1] < 1:
        raise ValueError(
            f"expected {name} of shape {layout} with both spatial sides >= 1, got {tuple(value.shape)}"
        )


def check_maps_and_labels(cams: object, labels: object) -> tuple[Tensor, Tensor]:
    """``(B, K, h, w)`` floating maps with both sides >= 1 and ``(B, K)`` labels of the same ``B, K``."""
    cams = check_tensor("cams", cams)
    labels = check_tensor("labels", labels)
    check_rank("cams", cams, 4, "(B, K, h, w)")
    check_rank("labels", labels, 2, "(B, K)")
    check_floating("cams", cams)
    check_map_size("cams", cams)
    if labels.shape != cams.shape[:2]:
        raise ValueError(
            f"expected cams of shape (B, K, h, w) matching labels (B, K) = {tuple(labels.shape)}, "
            f"got {tuple(cams.shape)}"
        )
    return cams, labels


def check_same_device(**tensors: Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"expected all inputs on one device, got {listing}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction to be one of {REDUCTIONS}, got {reduction!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"expected {name} to be one of {tuple(choices)}, got {value!r}")


ValueCheck = tuple[str, Tensor, str, Callable[[], str]]
"""``(argument name, 0-d bool tensor that is True when fine, expectation, lazy description of what came)``."""


class PendingChecks:
    """Value checks whose flags are computed on the device now and read on the host later.

    Reading them after a sync the caller pays anyway (finding the positive pairs) makes the checks
    cost no extra host-device round trip.
    """

    def __init__(self, checks: Sequence[ValueCheck]) -> None:
        self.checks = list(checks)
        self.flags = (
            torch.stack([ok.reshape(()).to(torch.bool) for _, ok, _, _ in self.checks])
            if self.checks
            else None
        )

    def raise_if_failed(self) -> None:
        if self.flags is None:
            return
        for (name, _, expectation, describe), ok in zip(self.checks, self.flags.tolist(), strict=True):
            if not ok:
                raise ValueError(f"expected {name} {expectation}, got {describe()}")


def check_values(checks: Sequence[ValueCheck]) -> None:
    """Raise for the first failed value check, paying one host-device sync for all of them.

    The description of the offending values is computed only on failure.
    """
    PendingChecks(checks).raise_if_failed()


def finite_check(name: str, value: Tensor) -> ValueCheck:
    return (
        name,
        torch.isfinite(value).all(),
        "to be finite",
        lambda: f"{int((~torch.isfinite(value)).sum())} NaN/inf values",
    )


def unit_interval_check(name: str, value: Tensor) -> ValueCheck:
    """Values in ``[0, 1]`` up to `unit_interval_tolerance`; the message shows the exact extremes."""
    tolerance = unit_interval_tolerance(value.dtype)

    def describe() -> str:
        value_ = value.detach()
        outside = int(((value_ < -tolerance) | (value_ > 1 + tolerance)).sum())
        return (
            f"values in [{float(value_.min())!r}, {float(value_.max())!r}] "
            f"({outside} of {value_.numel()} values beyond the tolerance {tolerance:g})"
        )

    return (
        name,
        ((value >= -tolerance) & (value <= 1 + tolerance)).all(),
        "to lie in [0, 1]",
        describe,
    )


def index_range_check(name: str, value: Tensor, size: int) -> ValueCheck:
    """Integer indices in ``[0, size)``."""
    return (
        name,
        ((value >= 0) & (value < size)).all(),
        f"to hold indices in [0, {size})",
        lambda: f"indices in [{int(value.min())}, {int(value.max())}]",
    )


def positive_check(name: str, value: Tensor) -> ValueCheck:
    return (name, (value > 0).all(), "> 0 in every entry", lambda: f"{value.tolist()}")


def binary_check(name: str, value: Tensor) -> ValueCheck:
    return (
        name,
        ((value == 0) | (value == 1)).all(),
        "to contain only 0 and 1 (multi-hot)",
        lambda: f"values {sorted(set(torch.unique(value).tolist()))[:8]}",
    )
