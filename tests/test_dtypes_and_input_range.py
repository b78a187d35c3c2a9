"""Dtypes (any floating images/cams, with or without autocast; losses in at least float32), the
rounding tolerance of the [0, 1] map check, and the first-call warning for un-normalised images."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import make_tiny_clip, tiny_tokenizer

import clims_loss as cl

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF = (torch.float16, torch.bfloat16)


def _batch(image_dtype: torch.dtype, cam_dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 40, 36, generator=generator).to(image_dtype)
    cams = torch.rand(2, 20, 6, 5, generator=generator).to(cam_dtype).requires_grad_()
    labels = torch.zeros(2, 20)
    labels[0, [3, 18]] = 1.0  # boat and train: both have background prompts in "voc"
    labels[1, 0] = 1.0
    return images, cams, labels


@pytest.fixture(scope="module")
def evaluator() -> cl.CLIPTextDrivenEvaluator:
    return cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())


@pytest.mark.parametrize(("image_dtype", "cam_dtype"), list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("autocast", [False, True])
def test_evaluator_takes_any_floating_dtype(
    evaluator: cl.CLIPTextDrivenEvaluator, image_dtype: torch.dtype, cam_dtype: torch.dtype, autocast: bool
) -> None:
    images, cams, labels = _batch(image_dtype, cam_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = evaluator(images, cams, labels)
    out.loss.backward()
    # Similarities and the CLIP terms in the text embeddings' dtype (float32 here); REG in at least float32.
    assert out.sim_fg_text.dtype == out.otm.dtype == out.cbs.dtype == torch.float32
    assert out.reg.dtype == torch.promote_types(cam_dtype, torch.float32)
    assert out.loss.dtype == torch.promote_types(cam_dtype, torch.float32)
    assert torch.isfinite(out.loss) and cams.grad is not None and cams.grad.dtype == cam_dtype
    assert torch.isfinite(cams.grad).all()
    # The value is float32's up to the inputs' rounding (and bf16 autocast inside CLIP).
    reference = evaluator(*(t.detach().float() for t in (images, cams, labels))).loss
    tolerance = 0.05 if autocast or image_dtype in HALF or cam_dtype in HALF else 1e-4
    assert out.loss.item() == pytest.approx(reference.item(), rel=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_call_under_autocast_with_any_image_dtype(dtype: torch.dtype) -> None:
    # The first call also reads the images' range (the un-normalised warning), under autocast too.
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = evaluator(*_batch(dtype, dtype))
    assert torch.isfinite(out.loss)


def test_views_are_cast_to_clip_parameter_dtype() -> None:
    seen: list[torch.dtype] = []
    clip = make_tiny_clip().double()
    encode = clip.encode_image

    def recording(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.dtype)
        return encode(images)

    clip.encode_image = recording  # type: ignore[method-assign]
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tiny_tokenizer())
    out = evaluator(*_batch(torch.bfloat16, torch.float16))
    assert seen == [torch.float64] and out.sim_fg_text.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", [cl.otm_loss, cl.btm_loss])
def test_pair_losses_compute_and_return_in_at_least_float32(dtype: torch.dtype, loss) -> None:  # type: ignore[no-untyped-def]
    # 1 - 1e-4 rounds to 1 in float16 and bfloat16: clamping there gave log(0) = -inf before.
    sims = torch.tensor([-1.0, 0.0, 0.3, 0.9999, 1.0], dtype=dtype, requires_grad=True)
    value = loss(sims, reduction="sum")
    (grad,) = torch.autograd.grad(value, sims)
    assert value.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.isfinite(value) and torch.isfinite(grad).all() and grad.dtype == dtype
    exact = loss(sims.detach().double(), reduction="sum")
    assert value.item() == pytest.approx(exact.item(), rel=1e-4)  # float32 rounding of 1 - eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_cbs_and_reg_compute_in_at_least_float32(dtype: torch.dtype) -> None:
    sims = torch.tensor([[0.2, 1.0], [0.5, -0.3]], dtype=dtype)
    mask = torch.tensor([[True, True], [True, False]])
    value = cl.cbs_loss(sims, mask, threshold=0.26, prompt_reduction="mean")
    assert value.dtype == torch.promote_types(dtype, torch.float32) and torch.isfinite(value)
    cams = torch.full((1, 2, 3, 3), 0.25, dtype=dtype)
    assert cl.reg_loss(cams).dtype == torch.promote_types(dtype, torch.float32)


def test_weights_join_the_dtype_promotion() -> None:
    sims = torch.tensor([0.5, 0.25], dtype=torch.bfloat16)
    assert cl.otm_loss(sims, torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert cl.otm_loss(sims, torch.ones(2, dtype=torch.float16)).dtype == torch.float32


def test_similarity_to_probability_follows_the_rule() -> None:
    half = torch.tensor([0.0, 1.0], dtype=torch.float16)
    probabilities = cl.similarity_to_probability(half)
    assert probabilities.dtype == torch.float32 and probabilities[1].item() < 1.0


# ----------------------------------------------------------------------------- [0, 1] tolerance
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-6), (torch.float64, 1e-6), (torch.float16, 2**-10), (torch.bfloat16, 2**-7)],
)
def test_maps_may_leave_the_unit_interval_by_the_stated_rounding_tolerance(
    dtype: torch.dtype, tolerance: float
) -> None:
    assert cl._validation.unit_interval_tolerance(dtype) == pytest.approx(tolerance)
    labels = torch.ones(1, 2)
    inside = torch.tensor([-tolerance, 1 + tolerance], dtype=torch.float64).to(dtype).view(1, 2, 1, 1)
    assert torch.isfinite(cl.reg_loss(inside, labels))
    cl.masked_views(torch.zeros(1, 3, 4, 4), inside, labels, size=4)


def test_sigmoid_from_another_dtype_that_exceeds_one_by_1e7_is_accepted() -> None:
    cams = torch.full((1, 2, 2, 2), 1.0 + 1.2e-7, dtype=torch.float32)  # one float32 step above 1
    assert cams.max().item() > 1.0
    assert cl.reg_loss(cams).item() == pytest.approx(1.0)


def test_unit_interval_message_shows_the_exact_extremes() -> None:
    cams = torch.full((1, 2, 2, 2), 0.5)
    cams[0, 1, 0, 0] = 1.00001
    cams[0, 0, 1, 1] = -0.25
    with pytest.raises(
        ValueError,
        match=r"expected cams to lie in \[0, 1\], got values in \[-0.25, 1.00001001358032\d*\] "
        r"\(2 of 8 values beyond the tolerance 1e-06\)",
    ):
        cl.reg_loss(cams)


# ----------------------------------------------------------------------------- first-call image warning
def _labels() -> torch.Tensor:
    labels = torch.zeros(2, 20)
    labels[0, 3] = 1.0
    return labels


def test_images_left_in_0_255_warn_on_the_first_call_only() -> None:
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    images = torch.rand(2, 3, 32, 32) * 255
    cams = torch.rand(2, 20, 4, 4)
    with pytest.warns(
        UserWarning, match=r"images passed to CLIPTextDrivenEvaluator lie in \[.*\], far outside .* 0\.\.255"
    ):
        evaluator(images, cams, _labels())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluator(images, cams, _labels())  # later calls: no check, no warning


def test_raw_pixels_warn_when_normalised_images_are_expected() -> None:
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    with pytest.warns(
        UserWarning,
        match=r"like raw pixels in \[0, 1\], but the evaluator expects them normalised .*UNIT_MEAN",
    ):
        evaluator(torch.rand(2, 3, 32, 32), torch.rand(2, 20, 4, 4), _labels())


@pytest.mark.parametrize(
    ("kwargs", "images"),
    [
        ({}, torch.randn(2, 3, 32, 32)),  # ImageNet-normalised-looking input
        ({"image_mean": cl.UNIT_MEAN, "image_std": cl.UNIT_STD}, torch.rand(2, 3, 32, 32)),
        ({"validate": False}, torch.rand(2, 3, 32, 32) * 255),
    ],
)
def test_no_warning_for_images_as_declared(kwargs: dict, images: torch.Tensor) -> None:  # type: ignore[type-arg]
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluator(images, torch.rand(2, 20, 4, 4), _labels())


def test_later_calls_add_no_host_device_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count host reads (``tolist``/``item``/``__bool__`` of tensors) of a step: the first call has one
    more (the image range) than every later call."""
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    images, cams, labels = torch.randn(2, 3, 32, 32), torch.rand(2, 20, 4, 4), _labels()
    reads: list[str] = []
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *args: object, _original=original, _name=method) -> object:  # type: ignore[no-untyped-def]
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    evaluator(images, cams, labels)
    first = len(reads)
    reads.clear()
    evaluator(images, cams, labels)
    second = len(reads)
    reads.clear()
    evaluator(images, cams, labels)
    assert first == second + 1 and len(reads) == second
