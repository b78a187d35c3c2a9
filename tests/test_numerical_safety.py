"""Hypothesis properties: no NaN or inf in any loss or gradient, over tensors *and* settings.

Every example draws one whole configuration: similarity tensors and maps in the profile's dtype
(float32, float16, bfloat16 or float64), values anywhere in ``[-1e4, 1e4]`` with the edges (``0``,
``+-1``, ``eps``, ``1 - eps``, the official thresholds) drawn often, and the settings: ``eps`` over the
whole accepted range for the dtype the clamp happens in (``[torch.finfo(dtype).eps, 0.5)``, log-uniform
plus its ends), ``similarity``, every reduction, a threshold, a prompt mask, per-pair weights and
`LossWeights`. Each of OTM, BTM, CBS, REG and their Eq. 13 sum must be finite, and so must the
gradient of the sum with respect to every input.

Two profiles: a short one in the default run (``SHORT_EXAMPLES`` per dtype) and a long one behind
``-m slow`` (``LONG_EXAMPLES`` per dtype), which prints its counts::

    PYTHONPATH=$PWD python -m pytest -m slow -s tests/test_numerical_safety.py

A float16 *leaf* receives its gradient rounded to float16, whose largest value is 65504; a weight over
``eps`` above that overflows to inf as any float16 gradient does (that is what a GradScaler detects).
Where the bound ``max weight / eps`` exceeds it, the gradient is checked in float32, the dtype the
loss computes in, and the example is counted separately.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clims_loss as cl
from clims_loss._validation import compute_dtype, unit_interval_tolerance

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
SHORT_EXAMPLES = 200
LONG_EXAMPLES = 2600
FLOAT16_MAX = float(torch.finfo(torch.float16).max)
REDUCTIONS = ("none", "mean", "sum")


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def smallest_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(compute_dtype(dtype)).eps)


@st.composite
def accepted_eps(draw: st.DrawFn, dtype: torch.dtype) -> float:
    low, high = smallest_eps(dtype), math.nextafter(0.5, 0.0)
    log_uniform = st.floats(math.log(low), math.log(high)).map(lambda x: min(max(math.exp(x), low), high))
    return draw(st.one_of(st.sampled_from([low, 1e-4, high]), log_uniform))


def _values(draw: st.DrawFn, count: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    edges = [-1.0, 0.0, 1.0, eps, 1.0 - eps, 1e-4, 0.9999, 0.26, 0.285, -eps, 1.0 + eps]
    element = st.one_of(st.sampled_from(edges), st.floats(-1.0, 1.0), st.floats(-1e4, 1e4))
    values = draw(st.lists(element, min_size=count, max_size=count))
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@dataclass
class LossCase:
    fg: torch.Tensor
    bg: torch.Tensor
    bgtext: torch.Tensor
    cams: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None
    pair_weights: torch.Tensor | None
    eps: float
    similarity: str
    pair_reduction: str
    cbs_reduction: str
    reg_reduction: str
    prompt_reduction: str
    threshold: float | None
    positive_only: bool
    weights: cl.LossWeights


@st.composite
def loss_cases(draw: st.DrawFn, dtype: torch.dtype) -> LossCase:
    eps = draw(accepted_eps(dtype))
    pairs, prompts = draw(st.integers(0, 6)), draw(st.integers(0, 5))
    batch, classes, height, width = (draw(st.integers(1, n)) for n in (3, 4, 4, 4))
    tolerance = unit_interval_tolerance(dtype)
    map_values = st.one_of(st.sampled_from([0.0, 1.0, -tolerance, 1.0 + tolerance]), st.floats(0.0, 1.0))
    cams = torch.tensor(
        draw(
            st.lists(
                map_values,
                min_size=batch * classes * height * width,
                max_size=batch * classes * height * width,
            )
        ),
        dtype=torch.float64,
    ).to(dtype)
    labels = torch.tensor(
        draw(st.lists(st.booleans(), min_size=batch * classes, max_size=batch * classes)), dtype=torch.bool
    )
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(
            draw(st.lists(st.booleans(), min_size=pairs * prompts, max_size=pairs * prompts)),
            dtype=torch.bool,
        )
    pair_weights = None
    if draw(st.booleans()):
        weights_dtype = draw(st.sampled_from([dtype, torch.float32]))
        pair_weights = torch.tensor(
            draw(st.lists(st.floats(0.0, 10.0), min_size=pairs, max_size=pairs)), dtype=torch.float64
        ).to(weights_dtype)
    weight = st.one_of(st.sampled_from([0.0, 1.0, 1000.0]), st.floats(0.0, 1000.0))
    threshold = draw(st.one_of(st.none(), st.sampled_from([0.26, 0.285, 0.0]), st.floats(-2.0, 2.0)))
    return LossCase(
        fg=_values(draw, pairs, eps, dtype),
        bg=_values(draw, pairs, eps, dtype),
        bgtext=_values(draw, pairs * prompts, eps, dtype).view(pairs, prompts),
        cams=cams.view(batch, classes, height, width),
        labels=labels.view(batch, classes).to(dtype),
        mask=None if mask is None else mask.view(pairs, prompts),
        pair_weights=pair_weights,
        eps=eps,
        similarity=draw(st.sampled_from(["clamp", "affine"])),
        pair_reduction=draw(st.sampled_from(REDUCTIONS)),
        cbs_reduction=draw(st.sampled_from(REDUCTIONS)),
        reg_reduction=draw(st.sampled_from(REDUCTIONS)),
        prompt_reduction=draw(st.sampled_from(["sum", "mean"])),
        threshold=threshold,
        positive_only=draw(st.booleans()),
        weights=cl.LossWeights(*(draw(weight) for _ in range(4))),
    )


def _terms(case: LossCase, leaves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    fg, bg, bgtext, cams = leaves
    common = dict(eps=case.eps, similarity=case.similarity)
    terms = {
        "otm": cl.otm_loss(fg, case.pair_weights, reduction=case.pair_reduction, **common),  # type: ignore[arg-type]
        "btm": cl.btm_loss(bg, case.pair_weights, reduction=case.pair_reduction, **common),  # type: ignore[arg-type]
        "cbs": cl.cbs_loss(
            bgtext,
            case.mask,
            threshold=case.threshold,
            prompt_reduction=case.prompt_reduction,
            reduction=case.cbs_reduction,
            **common,  # type: ignore[arg-type]
        ),
        "reg": cl.reg_loss(cams, case.labels, positive_only=case.positive_only, reduction=case.reg_reduction),
    }
    terms = {name: value.sum() for name, value in terms.items()}  # "none" -> a scalar to differentiate
    terms["loss"] = cl.combine_losses(terms["otm"], terms["btm"], terms["cbs"], terms["reg"], case.weights)
    return terms


def check_loss_case(case: LossCase, counts: Counter[str]) -> None:
    inputs = [case.fg, case.bg, case.bgtext, case.cams]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    terms = _terms(case, leaves)
    for name, value in terms.items():
        assert torch.isfinite(value), f"{name} = {value.item()} for {case}"
    # The dtype rule: computed and returned in promote_types(inputs, float32).
    pair_dtypes = [case.fg.dtype] if case.pair_weights is None else [case.fg.dtype, case.pair_weights.dtype]
    assert terms["otm"].dtype == terms["btm"].dtype == compute_dtype(*pair_dtypes)
    assert terms["cbs"].dtype == compute_dtype(case.bgtext.dtype)
    assert terms["reg"].dtype == compute_dtype(case.cams.dtype)
    largest_weight = max(case.weights.otm, case.weights.btm, case.weights.cbs)
    pair_weight = 1.0
    if case.pair_weights is not None and case.pair_weights.numel() > 0:
        pair_weight = max(float(case.pair_weights.float().max()), 1.0)
    if case.fg.dtype == torch.float16 and largest_weight * pair_weight / case.eps >= FLOAT16_MAX / 2:
        # The bound can exceed float16's range: check the gradient in the dtype the loss computes in.
        counts["fp16 gradient checked in float32"] += 1
        similarities = [t.detach().float().requires_grad_() for t in inputs[:3]]
        leaves = [*similarities, leaves[3]]  # the maps keep their dtype (and its [0, 1] tolerance)
        terms = _terms(case, leaves)
    gradients = torch.autograd.grad(terms["loss"], leaves, allow_unused=True)
    for name, gradient in zip(
        ("sim_fg_text", "sim_bg_text", "sim_fg_bgtext", "cams"), gradients, strict=True
    ):
        assert gradient is None or torch.isfinite(gradient).all(), f"gradient of {name} for {case}"
    counts["examples"] += 1


def run_loss_property(dtype: torch.dtype, examples: int) -> Counter[str]:
    counts: Counter[str] = Counter()

    @_settings(examples)
    @given(case=loss_cases(dtype))
    def no_nan_or_inf(case: LossCase) -> None:
        check_loss_case(case, counts)

    no_nan_or_inf()
    return counts


@pytest.mark.parametrize("name", list(DTYPES))
def test_no_nan_or_inf_in_losses_or_gradients_short(name: str) -> None:
    counts = run_loss_property(DTYPES[name], SHORT_EXAMPLES)
    assert counts["examples"] >= SHORT_EXAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DTYPES))
def test_no_nan_or_inf_in_losses_or_gradients_long(name: str) -> None:
    counts = run_loss_property(DTYPES[name], LONG_EXAMPLES)
    print(f"\n[{name}] {dict(counts)}; NaN/inf in losses or gradients: 0")
    assert counts["examples"] >= 2500


# ----------------------------------------------------------------------------- settings: error or finite
@st.composite
def any_settings(draw: st.DrawFn) -> dict[str, object]:
    anything = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.none(), st.text(max_size=3)
    )
    return {
        "weights": [draw(anything) for _ in range(4)],
        "eps": draw(st.one_of(anything, st.floats(0.0, 1e-6))),
        "threshold": draw(anything),
        "dtype": draw(st.sampled_from(list(DTYPES.values()))),
    }


@settings(max_examples=150, deadline=None, database=None)
@given(config=any_settings())
def test_any_setting_is_refused_clearly_or_gives_finite_losses(config: dict) -> None:  # type: ignore[type-arg]
    """No setting, however wrong, gives a silent NaN: it raises an "expected ..." error or is finite."""
    sims = torch.tensor([[-0.5, 0.2, 0.9999, 1.0]], dtype=config["dtype"]).requires_grad_()
    try:
        weights = cl.LossWeights(*config["weights"])
        terms = [
            cl.otm_loss(sims[0], eps=config["eps"]),
            cl.btm_loss(sims[0], eps=config["eps"]),
            cl.cbs_loss(sims, threshold=config["threshold"], eps=config["eps"]),
            cl.reg_loss(torch.full((1, 1, 2, 2), 0.5)),
        ]
    except (TypeError, ValueError) as error:
        assert str(error).startswith("expected "), str(error)
        return
    loss = cl.combine_losses(*terms, weights)
    (gradient,) = torch.autograd.grad(loss, sims)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()


# ----------------------------------------------------------------------------- the evaluator
EVALUATOR_SHORT, EVALUATOR_LONG = 5, 150


@st.composite
def evaluator_cases(draw: st.DrawFn, dtype: torch.dtype) -> dict[str, object]:
    return {
        "preset": draw(st.sampled_from(["voc", "voc-camera-ready", "voc-official", "coco"])),
        "similarity": draw(st.sampled_from(["clamp", "affine"])),
        "masking": draw(st.sampled_from(["pixel", "pass_through"])),
        "eps": draw(accepted_eps(torch.float32)),  # the similarities are float32 (text embeddings' dtype)
        "weights": cl.LossWeights(*(draw(st.floats(0.0, 100.0)) for _ in range(4))),
        "autocast": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "dtype": dtype,
    }


def check_evaluator_case(case: dict, clip: torch.nn.Module, tokenizer: object) -> None:  # type: ignore[type-arg]
    registry = cl.BackgroundPromptRegistry.preset(case["preset"])
    registry = registry.replace(similarity=case["similarity"], masking=case["masking"], eps=case["eps"])
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tokenizer, registry, weights=case["weights"])  # type: ignore[arg-type]
    classes = registry.num_classes
    generator = torch.Generator().manual_seed(case["seed"])
    images = torch.randn(2, 3, 24, 20, generator=generator).to(case["dtype"])
    cams = torch.rand(2, classes, 5, 4, generator=generator).to(case["dtype"]).requires_grad_()
    labels = (torch.rand(2, classes, generator=generator) < 0.15).float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["autocast"]):
        out = evaluator(images, cams, labels)
    (gradient,) = torch.autograd.grad(out.loss, cams)
    for name in ("loss", "otm", "btm", "cbs", "reg"):
        assert torch.isfinite(getattr(out, name)), f"{name} for {case}"
    assert torch.isfinite(gradient).all(), f"gradient for {case}"


def run_evaluator_property(dtype: torch.dtype, examples: int) -> int:
    from conftest import make_tiny_clip, tiny_tokenizer

    clip, tokenizer = make_tiny_clip(), tiny_tokenizer()
    count = [0]

    @_settings(examples)
    @given(case=evaluator_cases(dtype))
    def finite(case: dict) -> None:  # type: ignore[type-arg]
        check_evaluator_case(case, clip, tokenizer)
        count[0] += 1

    finite()
    return count[0]


@pytest.mark.parametrize("name", list(DTYPES))
def test_evaluator_finite_for_any_settings_short(name: str) -> None:
    assert run_evaluator_property(DTYPES[name], EVALUATOR_SHORT) >= EVALUATOR_SHORT


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DTYPES))
def test_evaluator_finite_for_any_settings_long(name: str) -> None:
    count = run_evaluator_property(DTYPES[name], EVALUATOR_LONG)
    print(f"\n[{name}] evaluator: {count} examples; NaN/inf in losses or gradients: 0")
    assert count >= EVALUATOR_LONG
