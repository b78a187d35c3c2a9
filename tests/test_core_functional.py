"""The four losses as functions: hand-computed values, reductions, gradients, numerical safety, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import clims_loss as cl

F64 = torch.float64


# ----------------------------------------------------------------------------- hand-computed values
def test_otm_hand_computed() -> None:
    sims = torch.tensor([0.5, 0.25], dtype=F64)
    expected = [-math.log(0.5), -math.log(0.25)]
    assert cl.otm_loss(sims, reduction="none").tolist() == pytest.approx(expected)
    assert cl.otm_loss(sims).item() == pytest.approx(sum(expected) / 2)
    assert cl.otm_loss(sims, reduction="sum").item() == pytest.approx(sum(expected))


def test_btm_hand_computed_with_weights() -> None:
    sims = torch.tensor([0.5, 0.2], dtype=F64)
    weights = torch.tensor([3.0, 1.0], dtype=F64)
    expected = [-3 * math.log(0.5), -math.log(0.8)]
    assert cl.btm_loss(sims, weights, reduction="none").tolist() == pytest.approx(expected)
    # "mean" is the official code's: mean over pairs of the weighted terms, not a weighted average.
    assert cl.btm_loss(sims, weights).item() == pytest.approx(sum(expected) / 2)


def test_cbs_hinge_sum_and_masked_mean() -> None:
    sims = torch.tensor([[0.1, 0.3, 0.5], [0.27, 0.2, 0.9]], dtype=F64)
    hinge = cl.cbs_loss(sims, threshold=0.26, reduction="none")
    expected = [-math.log(0.7) - math.log(0.5), -math.log(0.73) - math.log(0.1)]
    assert hinge.tolist() == pytest.approx(expected)

    mask = torch.tensor([[True, True, False], [False, False, False]])
    mean = cl.cbs_loss(sims, mask, prompt_reduction="mean", reduction="none")
    assert mean.tolist() == pytest.approx([(-math.log(0.9) - math.log(0.7)) / 2, 0.0])
    assert cl.cbs_loss(sims, mask, prompt_reduction="mean").item() == pytest.approx(mean.sum().item())


def test_cbs_mean_with_threshold_divides_by_the_pairs_prompts_not_by_those_above_it() -> None:
    # The decision: a prompt at or below the threshold counts as a zero term of the mean, so the
    # denominator is the number of prompts that apply to the pair (prompt_mask), threshold or not.
    sims = torch.tensor([[0.1, 0.3, 0.5, 0.9]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    value = cl.cbs_loss(sims, mask, threshold=0.26, prompt_reduction="mean", reduction="none")
    assert value.tolist() == pytest.approx([(-math.log(0.7) - math.log(0.5)) / 3])  # 2 above, 3 apply
    summed = cl.cbs_loss(sims, mask, threshold=0.26, prompt_reduction="sum", reduction="none")
    assert value.item() == pytest.approx(summed.item() / 3)


def test_cbs_mean_with_threshold_never_grows_when_a_similarity_falls() -> None:
    # Dividing by the prompts above the threshold would make the loss jump up here: the small term
    # (0.27) leaving the mean raises the average of the rest. With the chosen rule it only falls.
    mask = torch.ones(1, 3, dtype=torch.bool)
    before = torch.tensor([[0.27, 0.8, 0.1]], dtype=F64)
    after = torch.tensor([[0.25, 0.8, 0.1]], dtype=F64)  # the first prompt drops below 0.26
    loss_before = cl.cbs_loss(before, mask, threshold=0.26, prompt_reduction="mean")
    loss_after = cl.cbs_loss(after, mask, threshold=0.26, prompt_reduction="mean")
    assert loss_after.item() < loss_before.item()
    above_only = -math.log(1 - 0.8) / 1  # what "mean over the prompts above the threshold" would give
    assert above_only > (-math.log(1 - 0.27) - math.log(1 - 0.8)) / 2  # ... i.e. a jump up


def test_reg_all_maps_and_positive_only() -> None:
    cams = torch.zeros(2, 3, 4, 4, dtype=F64)
    cams[0, 0] = 1.0
    cams[1, 2, :2] = 1.0  # half of the map
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 1]], dtype=F64)
    assert cl.reg_loss(cams).item() == pytest.approx(1.5 / 6)
    assert cl.reg_loss(cams, labels, positive_only=True).item() == pytest.approx(1.5 / 3)
    per_map = cl.reg_loss(cams, labels, positive_only=True, reduction="none")
    assert per_map.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]


def test_combine_losses_is_eq13() -> None:
    terms = [torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0)]
    weights = cl.LossWeights(10.0, 24.0, 1.0, 0.2)
    assert cl.combine_losses(*terms, weights).item() == pytest.approx(10 + 48 + 3 + 0.8)


# ----------------------------------------------------------------------------- similarity handling
def test_similarities_outside_unit_interval_are_clamped_not_nan() -> None:
    sims = torch.tensor([-1.0, 0.0, 1.0, 1.5])
    for loss in (cl.otm_loss, cl.btm_loss):
        values = loss(sims, reduction="none")
        assert torch.isfinite(values).all()
        assert values.max().item() == pytest.approx(-math.log(1e-4), rel=1e-4)
    assert torch.isfinite(cl.cbs_loss(sims.view(2, 2))).all()


def test_clamp_gives_zero_gradient_outside_affine_keeps_it() -> None:
    sims = torch.tensor([-0.3], requires_grad=True)
    cl.otm_loss(sims).backward()
    assert sims.grad is not None and sims.grad.item() == 0.0
    sims.grad = None
    cl.otm_loss(sims, similarity="affine").backward()
    assert sims.grad is not None and sims.grad.item() < 0.0


def test_empty_batch_mean_is_zero() -> None:
    empty = torch.zeros(0)
    assert cl.otm_loss(empty).item() == 0.0
    assert cl.cbs_loss(torch.zeros(0, 4)).item() == 0.0


# ----------------------------------------------------------------------------- gradients (float64)
def test_gradcheck_all_losses() -> None:
    generator = torch.Generator().manual_seed(0)
    sims = (torch.rand(5, generator=generator, dtype=F64) * 0.8 + 0.1).requires_grad_()
    weights = torch.rand(5, generator=generator, dtype=F64) + 0.5
    bg = (torch.rand(5, 4, generator=generator, dtype=F64) * 0.8 + 0.1).requires_grad_()
    mask = torch.rand(5, 4, generator=generator) > 0.3
    cams = (torch.rand(2, 3, 4, 4, generator=generator, dtype=F64) * 0.8 + 0.1).requires_grad_()
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]], dtype=F64)

    assert torch.autograd.gradcheck(lambda s: cl.otm_loss(s, weights, validate=False), (sims,))
    assert torch.autograd.gradcheck(lambda s: cl.btm_loss(s, weights, similarity="affine"), (sims,))
    assert torch.autograd.gradcheck(
        lambda s: cl.cbs_loss(s, mask, prompt_reduction="mean", reduction="mean"), (bg,)
    )
    # The hinge is piecewise smooth; away from the threshold gradcheck holds.
    far = bg.detach().clone()
    far[(far - 0.5).abs() < 0.05] = 0.3
    far.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: cl.cbs_loss(s, threshold=0.5), (far,))
    assert torch.autograd.gradcheck(lambda c: cl.reg_loss(c, labels, positive_only=True), (cams,))


# ----------------------------------------------------------------------------- hypothesis
unit_sims = arrays("float64", st.integers(0, 12), elements=st.floats(-1.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(sims=unit_sims, mode=st.sampled_from(["clamp", "affine"]), eps=st.floats(1e-8, 0.4))
def test_no_nan_for_any_similarity(sims, mode: str, eps: float) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.from_numpy(sims).requires_grad_()
    for loss in (cl.otm_loss, cl.btm_loss):
        value = loss(tensor, similarity=mode, eps=eps)
        value.backward()
        assert torch.isfinite(value) and tensor.grad is not None and torch.isfinite(tensor.grad).all()
        tensor.grad = None
    value = cl.cbs_loss(tensor.view(-1, 1), threshold=0.0, similarity=mode, eps=eps)
    assert torch.isfinite(value)


@settings(max_examples=40, deadline=None)
@given(maps=arrays("float64", (2, 3, 4, 4), elements=st.floats(0.0, 1.0)), positive_only=st.booleans())
def test_no_nan_for_any_maps(maps, positive_only: bool) -> None:  # type: ignore[no-untyped-def]
    labels = torch.tensor([[0.0, 0, 0], [1, 0, 1]], dtype=F64)
    value = cl.reg_loss(torch.from_numpy(maps), labels, positive_only=positive_only)
    assert torch.isfinite(value) and 0.0 <= value.item() <= 1.0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cl.otm_loss(torch.zeros(2, 2)), r"sim_fg_text of shape \(N,\), got shape \(2, 2\)"),
        (lambda: cl.btm_loss(torch.zeros(3), torch.ones(2)), r"weights of shape \(N,\) = \(3,\)"),
        (lambda: cl.otm_loss(torch.tensor([0.5, float("nan")])), r"sim_fg_text to be finite, got 1 NaN"),
        (lambda: cl.otm_loss(torch.tensor([1, 0])), r"sim_fg_text to have a floating dtype"),
        (lambda: cl.otm_loss([0.5]), r"sim_fg_text to be a torch.Tensor, got list"),
        (lambda: cl.otm_loss(torch.zeros(2), reduction="avg"), r"reduction to be one of .* got 'avg'"),
        (lambda: cl.otm_loss(torch.zeros(2), similarity="log"), r"similarity to be one of"),
        (lambda: cl.otm_loss(torch.zeros(2), eps=0.0), r"eps in \(0, 0.5\)"),
        (lambda: cl.cbs_loss(torch.zeros(3)), r"sim_fg_bgtext of shape \(N, L\)"),
        (
            lambda: cl.cbs_loss(torch.zeros(2, 3), torch.ones(2, 2)),
            r"prompt_mask of shape \(N, L\) = \(2, 3\)",
        ),
        (lambda: cl.cbs_loss(torch.zeros(2, 3), prompt_reduction="max"), r"prompt_reduction to be one of"),
        (lambda: cl.reg_loss(torch.zeros(2, 3, 4)), r"cams of shape \(B, K, h, w\), got shape \(2, 3, 4\)"),
        (lambda: cl.reg_loss(torch.full((1, 2, 2, 2), 1.5)), r"cams to lie in \[0, 1\], got values in \[1.5"),
        (
            lambda: cl.reg_loss(torch.zeros(1, 2, 2, 2), torch.ones(1, 3)),
            r"labels of shape \(B, K\) = \(1, 2\)",
        ),
        (
            lambda: cl.reg_loss(torch.zeros(1, 2, 2, 2), torch.full((1, 2), 0.5)),
            r"labels to contain only 0 and 1",
        ),
        (lambda: cl.reg_loss(torch.zeros(1, 2, 2, 2), positive_only=True), r"needs labels"),
        (lambda: cl.combine_losses(*[torch.tensor(1.0)] * 4, (1, 2, 3, 4)), r"weights to be a LossWeights"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_mixed_devices_raise() -> None:
    sims = torch.zeros(2)
    with pytest.raises(ValueError, match=r"one device, got sim_fg_text on cpu, weights on meta"):
        cl.otm_loss(sims, torch.zeros(2, device="meta"))
