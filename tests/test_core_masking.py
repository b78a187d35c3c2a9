"""The fused masking path against a naive per-pair loop, its invariances and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import clims_loss as cl

F64 = torch.float64


def _vector(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64).view(1, 3, 1, 1)


def naive_views(images, cams, labels, size, mode):  # type: ignore[no-untyped-def]
    """One pair at a time, written from the definition: fg = X * P_k, bg = X * (1 - P_k)."""
    fg_views, bg_views = [], []
    for b in range(labels.shape[0]):
        for k in range(labels.shape[1]):
            if labels[b, k] != 1:
                continue
            image, cam = images[b : b + 1], cams[b : b + 1, k : k + 1]
            if mode == "pixel":
                pixels = image * _vector(cl.IMAGENET_STD) + _vector(cl.IMAGENET_MEAN)
                down = image.shape[-1] > size or image.shape[-2] > size
                pixels = F.interpolate(pixels, (size, size), mode="bilinear", antialias=down)
                mask = F.interpolate(cam, (size, size), mode="bilinear")
                fg = (pixels * mask - _vector(cl.CLIP_MEAN)) / _vector(cl.CLIP_STD)
                bg = (pixels * (1 - mask) - _vector(cl.CLIP_MEAN)) / _vector(cl.CLIP_STD)
            else:
                resized = F.interpolate(image, (size, size), mode="bilinear", align_corners=True)
                mask = F.interpolate(cam, (size, size), mode="bilinear", align_corners=True)
                fg, bg = resized * mask, resized * (1 - mask)
            fg_views.append(fg)
            bg_views.append(bg)
    return torch.cat(fg_views), torch.cat(bg_views)


def _inputs(seed: int = 0, batch: int = 3, classes: int = 4, image: int = 40, maps: int = 6):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image, image + 8, generator=generator, dtype=F64)
    cams = torch.rand(batch, classes, maps, maps, generator=generator, dtype=F64).requires_grad_()
    labels = (torch.rand(batch, classes, generator=generator) > 0.5).to(F64)
    labels[0, 0] = 1.0
    return images, cams, labels


@pytest.mark.parametrize("mode", ["pixel", "pass_through"])
@pytest.mark.parametrize("size", [16, 64])
def test_fused_equals_naive_values_and_gradients(mode: str, size: int) -> None:
    images, cams, labels = _inputs()
    fused = cl.masked_views(images, cams, labels, size=size, mode=mode)
    fg, bg = naive_views(images, cams, labels, size, mode)
    torch.testing.assert_close(fused.fg, fg)
    torch.testing.assert_close(fused.bg, bg)

    probe = torch.randn_like(fused.views)
    (grad_fused,) = torch.autograd.grad((fused.views * probe).sum(), cams)
    (grad_naive,) = torch.autograd.grad((torch.cat([fg, bg]) * probe).sum(), cams)
    torch.testing.assert_close(grad_fused, grad_naive)


def test_pair_order_and_indices() -> None:
    labels = torch.tensor([[0.0, 1, 1], [0, 0, 0], [1, 0, 0]])
    out = cl.masked_views(torch.zeros(3, 3, 8, 8), torch.rand(3, 3, 4, 4), labels, size=8)
    assert out.batch_index.tolist() == [0, 0, 2]
    assert out.class_index.tolist() == [1, 2, 0]
    assert out.num_pairs == 3 and out.views.shape == (6, 3, 8, 8)


def test_all_ones_map_gives_clip_normalised_image_and_fill_background() -> None:
    images, _, labels = _inputs()
    ones = torch.ones(3, 4, 5, 5, dtype=F64)
    out = cl.masked_views(images, ones, labels, size=24)
    pixels = F.interpolate(
        images * _vector(cl.IMAGENET_STD) + _vector(cl.IMAGENET_MEAN),
        (24, 24),
        mode="bilinear",
        antialias=True,
    )
    expected_fg = ((pixels - _vector(cl.CLIP_MEAN)) / _vector(cl.CLIP_STD))[out.batch_index]
    torch.testing.assert_close(out.fg, expected_fg)
    fill = (-_vector(cl.CLIP_MEAN) / _vector(cl.CLIP_STD)).expand_as(out.bg)
    torch.testing.assert_close(out.bg, fill)


def test_fg_plus_bg_is_the_unmasked_image_in_pass_through() -> None:
    images, cams, labels = _inputs(seed=3)
    out = cl.masked_views(images, cams, labels, size=20, mode="pass_through")
    resized = F.interpolate(images, (20, 20), mode="bilinear", align_corners=True)[out.batch_index]
    torch.testing.assert_close(out.fg + out.bg, resized)


def test_no_positive_pairs_gives_empty_views() -> None:
    images, cams, _ = _inputs()
    out = cl.masked_views(images, cams, torch.zeros(3, 4, dtype=F64), size=16)
    assert out.views.shape == (0, 3, 16, 16) and out.num_pairs == 0


@settings(max_examples=25, deadline=None)
@given(
    maps=st.integers(1, 12),
    size=st.integers(4, 20),
    fill=st.sampled_from([0.0, 1.0, None]),
    mode=st.sampled_from(["pixel", "pass_through"]),
)
def test_finite_for_any_maps_in_unit_interval(maps: int, size: int, fill: float | None, mode: str) -> None:
    images, _, labels = _inputs()
    cams = torch.rand(3, 4, maps, maps, dtype=F64) if fill is None else torch.full((3, 4, maps, maps), fill)
    out = cl.masked_views(images, cams.to(F64), labels, size=size, mode=mode)
    assert torch.isfinite(out.views).all()


def test_dtype_and_device_follow_the_input() -> None:
    images, cams, labels = _inputs()
    out = cl.masked_views(images.float(), cams.detach().float(), labels, size=8)
    assert out.views.dtype == torch.float32
    out = cl.masked_views(images.float(), cams, labels, size=8)
    assert out.views.dtype == F64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(images=torch.zeros(3, 1, 8, 8)),
            r"images of shape \(B, 3, H, W\) with 3 RGB channels, got \(3, 1, 8, 8\)",
        ),
        (dict(images=torch.zeros(3, 8, 8)), r"images of shape \(B, 3, H, W\), got shape \(3, 8, 8\)"),
        (dict(images=torch.zeros(2, 3, 8, 8)), r"images of shape \(B, 3, H, W\) with B = 3"),
        (
            dict(cams=torch.zeros(3, 5, 4, 4)),
            r"cams of shape \(B, K, h, w\) matching labels \(B, K\) = \(3, 4\)",
        ),
        (dict(cams=torch.zeros(3, 4, 4)), r"cams of shape \(B, K, h, w\), got shape \(3, 4, 4\)"),
        (dict(labels=torch.zeros(3)), r"labels of shape \(B, K\), got shape \(3,\)"),
        (dict(labels=torch.full((3, 4), 2.0)), r"labels to contain only 0 and 1"),
        (dict(cams=torch.full((3, 4, 4, 4), -0.1)), r"cams to lie in \[0, 1\], got values in \[-0.1"),
        (dict(cams=torch.full((3, 4, 4, 4), float("nan"))), r"cams to be finite, got 192 NaN/inf"),
        (dict(images=torch.full((3, 3, 8, 8), float("inf"))), r"images to be finite"),
        (
            dict(images=torch.zeros(3, 3, 8, 8, dtype=torch.uint8)),
            r"images to have a floating dtype, got torch.uint8",
        ),
        (
            dict(labels=torch.ones(3, 4, device="meta")),
            r"one device, got images on cpu, cams on cpu, labels on meta",
        ),
        (dict(mode="normalised"), r"mode to be one of \('pixel', 'pass_through'\)"),
        (dict(size=0), r"size to be a positive int, got 0"),
        (dict(image_mean=(0.5, 0.5)), r"image_mean to hold 3 per-channel values"),
    ],
)
def test_bad_input_raises(change: dict, message: str) -> None:  # type: ignore[type-arg]
    arguments = dict(images=torch.zeros(3, 3, 8, 8), cams=torch.rand(3, 4, 4, 4), labels=torch.ones(3, 4))
    arguments.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        cl.masked_views(**arguments)  # type: ignore[arg-type]
