"""``overlay_cam``: a class activation map blended over its image, as a picture (numpy/torch only).

Two conventions, chosen by the type of ``image``:

* a **numpy** image ``(H, W, 3)``, ``uint8`` (0..255) or floating in ``[0, 1]``: the picture
  convention of PIL and matplotlib. The result is ``(H, W, 3)`` ``uint8``, ready for
  ``PIL.Image.fromarray``.
* a **torch** image ``(3, H, W)`` or ``(B, 3, H, W)``, floating in ``[0, 1]``: the tensor convention.
  The result has the image's shape, dtype and device, in ``[0, 1]``.

The map is ``(h, w)`` (or ``(B, h, w)`` with a batch of images) in ``[0, 1]`` (divide a raw CAM by its
maximum first), resized bilinearly to the image when its size differs.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clims_loss._validation import (
    check_floating,
    check_real,
    check_tensor,
    check_values,
    finite_check,
    unit_interval_check,
)

__all__ = ["COLORMAPS", "colorize", "overlay_cam"]

#: Piecewise-linear colour maps: name -> control points (value, (r, g, b)) in [0, 1].
COLORMAPS: dict[str, tuple[tuple[float, tuple[float, float, float]], ...]] = {
    # blue (0) through cyan, yellow to red (1), like matplotlib's jet
    "jet": (
        (0.0, (0.0, 0.0, 0.5)),
        (0.11, (0.0, 0.0, 1.0)),
        (0.125, (0.0, 0.0, 1.0)),
        (0.375, (0.0, 1.0, 1.0)),
        (0.625, (1.0, 1.0, 0.0)),
        (0.875, (1.0, 0.0, 0.0)),
        (1.0, (0.5, 0.0, 0.0)),
    ),
    # black through red, yellow to white
    "hot": ((0.0, (0.0, 0.0, 0.0)), (0.4, (1.0, 0.0, 0.0)), (0.8, (1.0, 1.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
    "gray": ((0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
}


def _colour_table(colormap: str | Tensor | np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(N, 3)`` colours for values ``0, 1/(N-1), ..., 1``."""
    if isinstance(colormap, str):
        if colormap not in COLORMAPS:
            raise ValueError(
                f"expected colormap to be one of {tuple(COLORMAPS)} or an (N, 3) table, got {colormap!r}"
            )
        points = COLORMAPS[colormap]
        grid = np.linspace(0.0, 1.0, 256)
        positions = [p for p, _ in points]
        channels = [np.interp(grid, positions, [c[i] for _, c in points]) for i in range(3)]
        return torch.as_tensor(np.stack(channels, axis=1), dtype=dtype, device=device)
    given = torch.from_numpy(colormap) if isinstance(colormap, np.ndarray) else colormap
    if not isinstance(given, Tensor):
        raise TypeError(
            f"expected colormap to be a name {tuple(COLORMAPS)} or an (N, 3) table, "
            f"got {type(colormap).__name__}"
        )
    if given.dim() != 2 or given.shape[1] != 3 or given.shape[0] < 2:
        raise ValueError(f"expected colormap table of shape (N, 3) with N >= 2, got {tuple(given.shape)}")
    check_floating("colormap", given)
    table = given.to(device=device, dtype=dtype)
    check_values([finite_check("colormap", table), unit_interval_check("colormap", table)])
    return table


def colorize(values: Tensor, colormap: str | Tensor | np.ndarray = "jet") -> Tensor:
    """``(...,)`` values in ``[0, 1]`` -> ``(..., 3)`` colours in ``[0, 1]`` (linear between table entries).

    >>> colorize(torch.tensor([0.0, 1.0]), "gray").tolist()
    [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    values = check_tensor("values", values)
    check_floating("values", values)
    dtype = torch.promote_types(values.dtype, torch.float32)
    table = _colour_table(colormap, values.device, dtype)
    position = values.to(dtype).clamp(0.0, 1.0) * (table.shape[0] - 1)
    low = position.floor().long().clamp(max=table.shape[0] - 2)
    weight = (position - low.to(dtype)).unsqueeze(-1)
    return table[low] * (1 - weight) + table[low + 1] * weight


@overload
def overlay_cam(
    image: np.ndarray,
    cam: np.ndarray | Tensor,
    *,
    alpha: float = ...,
    colormap: str | Tensor | np.ndarray = ...,
) -> np.ndarray: ...
@overload
def overlay_cam(
    image: Tensor, cam: np.ndarray | Tensor, *, alpha: float = ..., colormap: str | Tensor | np.ndarray = ...
) -> Tensor: ...
def overlay_cam(
    image: np.ndarray | Tensor,
    cam: np.ndarray | Tensor,
    *,
    alpha: float = 0.5,
    colormap: str | Tensor | np.ndarray = "jet",
) -> np.ndarray | Tensor:
    """Blend a colour-mapped CAM over an image: ``(1 - alpha) * image + alpha * colormap(cam)``.

    Args:
        image: numpy ``(H, W, 3)`` ``uint8`` or floating in ``[0, 1]``; or a floating tensor
            ``(3, H, W)`` / ``(B, 3, H, W)`` in ``[0, 1]`` (see the module docs).
        cam: ``(h, w)`` map in ``[0, 1]`` (``(B, h, w)`` with a batch of images), numpy or torch,
            any size (resized bilinearly to ``H x W``).
        alpha: weight of the colour map, in ``[0, 1]`` (``0``: the image, ``1``: the map alone).
        colormap: ``"jet"`` (default), ``"hot"``, ``"gray"``, or an ``(N, 3)`` table of colours in
            ``[0, 1]`` for the values ``0 .. 1``.

    Returns:
        numpy in: ``(H, W, 3)`` ``uint8``. torch in: the image's shape, dtype and device, in ``[0, 1]``.

    >>> picture = overlay_cam(np.zeros((4, 6, 3), np.uint8), np.ones((2, 3)), alpha=1.0, colormap="gray")
    >>> picture.shape, picture.dtype, int(picture.max())
    ((4, 6, 3), dtype('uint8'), 255)
    """
    alpha = check_real("alpha", alpha, minimum=0.0)
    if alpha > 1.0:
        raise ValueError(f"expected alpha in [0, 1], got {alpha!r}")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a numpy image of shape (H, W, 3), got {image.shape}")
        if image.dtype == np.uint8:
            pixels = torch.from_numpy(image.astype(np.float32) / 255.0)
        elif np.issubdtype(image.dtype, np.floating):
            pixels = torch.from_numpy(np.ascontiguousarray(image))
        else:
            raise TypeError(f"expected a numpy image of dtype uint8 or floating, got {image.dtype}")
        pixels = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
        single = True
    else:
        pixels = check_tensor("image", image)
        check_floating("image", pixels)
        if pixels.dim() not in (3, 4) or pixels.shape[-3] != 3:
            raise ValueError(
                f"expected an image tensor of shape (3, H, W) or (B, 3, H, W), got {tuple(pixels.shape)}"
            )
        single = pixels.dim() == 3
        pixels = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    if pixels.shape[-2] < 1 or pixels.shape[-1] < 1:
        raise ValueError(f"expected an image with both sides >= 1, got {tuple(image.shape)}")

    maps = torch.from_numpy(np.asarray(cam)) if isinstance(cam, np.ndarray) else check_tensor("cam", cam)
    check_floating("cam", maps)
    batch = pixels.shape[0]
    expected = "(h, w)" if single else f"(h, w) or ({batch}, h, w)"
    if maps.dim() == 2:
        maps = maps.unsqueeze(0).expand(batch, -1, -1)
    elif maps.dim() != 3 or maps.shape[0] != batch or single:
        raise ValueError(
            f"expected cam of shape {expected} for an image of shape {tuple(image.shape)}, "
            f"got {tuple(maps.shape)}"
        )
    if maps.shape[-2] < 1 or maps.shape[-1] < 1:
        raise ValueError(f"expected cam of shape {expected} with both sides >= 1, got {tuple(maps.shape)}")
    dtype = torch.promote_types(torch.promote_types(pixels.dtype, maps.dtype), torch.float32)
    pixels = pixels.to(dtype)
    maps = maps.to(device=pixels.device, dtype=dtype)
    check_values(
        [
            finite_check("image", pixels),
            unit_interval_check("image", pixels),
            finite_check("cam", maps),
            unit_interval_check("cam", maps),
        ]
    )
    if maps.shape[-2:] != pixels.shape[-2:]:
        maps = F.interpolate(maps.unsqueeze(1), size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        maps = maps.squeeze(1)
    heat = colorize(maps, colormap).permute(0, 3, 1, 2)  # (B, 3, H, W)
    blended = ((1.0 - alpha) * pixels + alpha * heat).clamp(0.0, 1.0)
    if isinstance(image, np.ndarray):
        picture: np.ndarray = (blended[0].permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
        return picture
    return blended.reshape(image.shape).to(image.dtype)
