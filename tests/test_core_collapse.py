"""The collapse rule (clims_loss.collapse): per-class activation split by labels, vanishing and flooding."""

from __future__ import annotations

import math

import pytest
import torch

import clims_loss as cl


def _maps(values: list[list[float]]) -> torch.Tensor:
    """(B, K, 3, 3) maps, each constant at the given value."""
    return torch.tensor(values).view(len(values), -1, 1, 1).expand(-1, -1, 3, 3).contiguous()


def test_activation_is_split_by_label_and_adds_over_batches() -> None:
    cams = _maps([[0.8, 0.1], [0.2, 0.6], [0.4, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    whole = cl.class_activation(cams, labels)
    assert whole.positive_mean.tolist() == pytest.approx([0.6, 0.6])
    assert whole.negative_mean.tolist() == pytest.approx([0.2, 0.05])
    # Sums and counts add: two halves give the whole.
    halves = cl.class_activation(cams[:1], labels[:1]) + cl.class_activation(cams[1:], labels[1:])
    assert torch.equal(halves.as_tensor(), whole.as_tensor())
    assert torch.equal(cl.ClassActivation.from_tensor(whole.as_tensor()).as_tensor(), whole.as_tensor())


def test_a_class_without_images_has_no_mean_and_no_verdict() -> None:
    activation = cl.class_activation(_maps([[0.5, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert math.isnan(float(activation.positive_mean[1]))
    assert math.isnan(float(activation.negative_mean[0]))
    check = cl.detect_collapse(activation, [0.5, 0.5])
    assert check.collapsed.tolist() == [False, False]


@pytest.mark.parametrize(
    ("value", "reference", "fraction", "vanished"),
    [(0.09, 0.4, 0.25, True), (0.11, 0.4, 0.25, False), (0.0, 0.0, 0.25, False), (0.3, 0.4, 0.8, True)],
)
def test_vanishing_is_a_fraction_of_the_baseline(
    value: float, reference: float, fraction: float, vanished: bool
) -> None:
    activation = cl.class_activation(_maps([[value]]), torch.ones(1, 1))
    check = cl.detect_collapse(activation, torch.tensor([reference]), fraction=fraction)
    assert check.vanished.tolist() == [vanished]
    assert check.flooded.tolist() == [False]


def test_flooding_is_activation_on_images_without_the_class() -> None:
    cams = _maps([[0.9, 0.7], [0.9, 0.2]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # class 1 is absent from image 0, where its map is 0.7
    check = cl.detect_collapse(cl.class_activation(cams, labels), [0.5, 0.5], flood_level=0.6)
    assert check.flooded.tolist() == [False, True]
    assert check.collapsed_classes(["cat", "dog"]) == ["dog"]
    (message,) = check.messages(["cat", "dog"])
    assert "'dog' floods" in message and "0.7000" in message and "0.6" in message
    assert not cl.detect_collapse(
        cl.class_activation(cams, labels), [0.5, 0.5], flood_level=None
    ).flooded.any()


def test_a_baseline_that_floods_already_is_no_collapse() -> None:
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    baseline = cl.class_activation(_maps([[0.9, 0.7], [0.9, 0.9]]), labels)  # class 1 floods image 0 already
    same = cl.detect_collapse(cl.class_activation(_maps([[0.9, 0.65], [0.9, 0.9]]), labels), baseline)
    assert not same.flooded.any()
    worse = cl.detect_collapse(cl.class_activation(_maps([[0.9, 0.8], [0.9, 0.9]]), labels), baseline)
    assert worse.flooded.tolist() == [False, True]
    assert worse.messages(["cat", "dog"])[0].endswith("above 0.6 and the baseline's 0.7000")


def test_messages_name_the_class_the_value_and_the_reference() -> None:
    check = cl.detect_collapse(cl.class_activation(_maps([[0.01]]), torch.ones(1, 1)), [0.4])
    assert check.messages(["boat"]) == [
        "class 'boat' collapsed: mean activation 0.0100 on the images that contain it, below 0.25 x the "
        "baseline's 0.4000"
    ]
    # The reference may be the baseline's own ClassActivation.
    baseline = cl.class_activation(_maps([[0.4]]), torch.ones(1, 1))
    assert cl.detect_collapse(
        cl.class_activation(_maps([[0.01]]), torch.ones(1, 1)), baseline
    ).vanished.item()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: cl.class_activation(torch.rand(2, 3, 4), torch.ones(2, 3)), ValueError, "(B, K, h, w)"),
        (lambda: cl.class_activation(torch.rand(2, 3, 4, 4), torch.ones(2, 2)), ValueError, "(2, 2)"),
        (lambda: cl.class_activation(torch.rand(2, 3, 4, 4) + 1, torch.ones(2, 3)), ValueError, "[0, 1]"),
        (
            lambda: cl.class_activation(torch.rand(1, 1, 2, 2), torch.full((1, 1), 2.0)),
            ValueError,
            "multi-hot",
        ),
        (
            lambda: cl.class_activation(torch.ones(1, 1, 2, 2, dtype=torch.long), torch.ones(1, 1)),
            TypeError,
            "dtype",
        ),
        (lambda: cl.detect_collapse("x", [1.0]), TypeError, "activation"),  # type: ignore[arg-type]
        (lambda: cl.detect_collapse(cl.ClassActivation.zeros(2), [1.0]), ValueError, "(K,) = (2,)"),
        (
            lambda: cl.detect_collapse(cl.ClassActivation.zeros(1), [1.0], fraction=1.5),
            ValueError,
            "fraction",
        ),
        (
            lambda: cl.detect_collapse(cl.ClassActivation.zeros(1), [1.0], flood_level=-1),
            ValueError,
            "flood_level",
        ),
        (lambda: cl.ClassActivation.zeros(2) + cl.ClassActivation.zeros(3), ValueError, "2 classes"),
        (
            lambda: cl.detect_collapse(cl.ClassActivation.zeros(1), [1.0]).messages(["a", "b"]),
            ValueError,
            "1 class",
        ),
    ],
)
def test_errors_name_the_argument(call: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=None) as caught:
        call()  # type: ignore[operator]
    assert message in str(caught.value)
