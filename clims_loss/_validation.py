"""Input checks shared by the functional API and the evaluator.

Every check raises an exception that names the argument and says what was expected and what was
received, so a user can fix the call without reading the library's source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


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
    return (
        name,
        ((value >= 0) & (value <= 1)).all(),
        "to lie in [0, 1]",
        lambda: f"values in [{value.min().item():.4g}, {value.max().item():.4g}]",
    )


def binary_check(name: str, value: Tensor) -> ValueCheck:
    return (
        name,
        ((value == 0) | (value == 1)).all(),
        "to contain only 0 and 1 (multi-hot)",
        lambda: f"values {sorted(set(torch.unique(value).tolist()))[:8]}",
    )
