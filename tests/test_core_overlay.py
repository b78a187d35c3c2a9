"""overlay_cam: shapes, dtypes and ranges of both conventions, the blend itself, and the error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clims_loss as cl


def test_numpy_in_uint8_picture_out_resized_to_the_image() -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    picture = cl.overlay_cam(image, np.random.default_rng(1).random((5, 8)).astype(np.float32))
    assert picture.shape == (20, 30, 3) and picture.dtype == np.uint8
    # Float pixels in [0, 1] give the same picture as their uint8 form.
    same = cl.overlay_cam(image.astype(np.float64) / 255, np.random.default_rng(1).random((5, 8)))
    assert np.abs(same.astype(int) - picture.astype(int)).max() <= 1


def test_alpha_zero_is_the_image_and_alpha_one_is_the_colour_map() -> None:
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    cam = np.linspace(0, 1, 36, dtype=np.float32).reshape(6, 6)
    assert np.array_equal(cl.overlay_cam(image, cam, alpha=0.0), image)
    gray = cl.overlay_cam(image, cam, alpha=1.0, colormap="gray")
    assert np.array_equal(gray[..., 0], (cam * 255 + 0.5).astype(np.uint8))
    jet = cl.overlay_cam(image, cam, alpha=1.0)
    assert jet[0, 0, 2] > jet[0, 0, 0] and jet[-1, -1, 0] > jet[-1, -1, 2]  # low is blue, high is red


def test_torch_in_torch_out_batched_with_its_dtype_and_range() -> None:
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    cams = torch.rand(2, 4, 4)
    out = cl.overlay_cam(images, cams, alpha=0.3)
    assert out.shape == images.shape and out.dtype == torch.float64
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    single = cl.overlay_cam(images[1], cams[1], alpha=0.3)
    assert single.shape == (3, 8, 8)
    torch.testing.assert_close(single, out[1])
    table = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # black to green
    green = cl.overlay_cam(images[0], torch.ones(8, 8), alpha=1.0, colormap=table)
    torch.testing.assert_close(
        green, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).view(3, 1, 1).expand(3, 8, 8)
    )


@pytest.mark.parametrize(
    ("image", "cam", "kwargs", "error", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 4)), {}, ValueError, "(H, W, 3), got (4, 4)"),
        (np.zeros((4, 4, 3), np.int32), np.zeros((4, 4)), {}, TypeError, "uint8 or floating, got int32"),
        (torch.rand(4, 4, 3), torch.rand(4, 4), {}, ValueError, "(3, H, W) or (B, 3, H, W), got (4, 4, 3)"),
        (torch.rand(3, 4, 4), torch.rand(2, 4, 4), {}, ValueError, "cam of shape (h, w) for an image"),
        (torch.rand(2, 3, 4, 4), torch.rand(3, 4, 4), {}, ValueError, "(h, w) or (2, h, w)"),
        (np.zeros((4, 4, 3)), np.full((4, 4), 2.0), {}, ValueError, "expected cam to lie in [0, 1]"),
        (np.full((4, 4, 3), 3.0), np.zeros((4, 4)), {}, ValueError, "expected image to lie in [0, 1]"),
        (np.zeros((4, 4, 3)), np.full((4, 4), np.nan), {}, ValueError, "expected cam to be finite"),
        (np.zeros((4, 4, 3)), np.zeros((4, 4)), {"alpha": 1.5}, ValueError, "alpha in [0, 1]"),
        (np.zeros((4, 4, 3)), np.zeros((4, 4)), {"colormap": "viridis"}, ValueError, "'jet', 'hot', 'gray'"),
        (np.zeros((4, 4, 3)), np.zeros((4, 4)), {"colormap": np.zeros((4, 2))}, ValueError, "(N, 3)"),
        (np.zeros((4, 4, 3)), np.zeros((4, 4), np.int64), {}, TypeError, "cam to have a floating dtype"),
    ],
)
def test_errors_name_the_argument_and_the_shapes(
    image: object, cam: object, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        cl.overlay_cam(image, cam, **kwargs)  # type: ignore[call-overload]
    assert message in str(caught.value)
