"""Units of IRNet (clims_pipeline.irnet): relation labels, boundary affinities, the IRN loss and the
boundary-driven random walk, each against an oracle (CPU, offline, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clims_pipeline.crf import CRF_INSTALL_HINT, IRN_LABEL_CRF, crf_available, dense_crf_labels
from clims_pipeline.irnet import (
    IRN_STRIDE,
    boundary_affinities,
    build_irnet,
    class_boundaries,
    irn_loss,
    path_pixels,
    relation_label_map,
    semantic_labels,
)
from clims_pipeline.metrics import confusion_matrix, iou_from_confusion, mean_iou
from clims_pipeline.random_walk import IGNORE_LABEL, affinity_label_masks, pair_offsets

needs_crf = pytest.mark.skipif(not crf_available(), reason=f"pydensecrf2 missing: {CRF_INSTALL_HINT}")


def disc(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2


def two_object_mask(size: int = 128) -> np.ndarray:
    """Background 0, a disc of class 3 (key 2) and a rectangle of class 8 (key 7)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[disc(size, (size * 0.35, size * 0.3), size * 0.2)] = 3
    mask[int(size * 0.55) : int(size * 0.9), int(size * 0.55) : int(size * 0.9)] = 8
    return mask


def miou(prediction: np.ndarray, mask: np.ndarray) -> float:
    return mean_iou(iou_from_confusion(confusion_matrix(mask, prediction, 21, 255)))


# ------------------------------------------------------------------------------------------------ labels


def test_relation_labels_of_a_three_level_cam_are_core_ring_and_background() -> None:
    size = 32
    core, ring = disc(size, (16, 16), 6), disc(size, (16, 16), 10)
    cam = np.where(core, 0.9, np.where(ring, 0.2, 0.05)).astype(np.float32)[None]
    labels = relation_label_map(np.zeros((size, size, 3), np.uint8), cam, np.array([4]), 0.30, 0.10)
    expected = np.where(core, 5, np.where(ring, IGNORE_LABEL, 0))
    np.testing.assert_array_equal(labels, expected)


def test_relation_labels_of_a_cam_equal_to_a_mask_give_exactly_the_expected_pairs() -> None:
    mask = two_object_mask(16)
    keys = np.array([2, 7])
    cams = np.stack([(mask == 3), (mask == 8)]).astype(np.float32)
    labels = relation_label_map(np.zeros((16, 16, 3), np.uint8), cams, keys, 0.30, 0.10)
    np.testing.assert_array_equal(labels, mask)  # nothing ignored: every pixel is confident
    offsets = pair_offsets(4)
    background, foreground, negative = (
        m[0].numpy() for m in affinity_label_masks(torch.from_numpy(mask)[None], offsets)
    )
    for index, (dy, dx) in enumerate(offsets):
        for y in range(16):
            for x in range(16):
                inside = 0 <= y + dy < 16 and 0 <= x + dx < 16
                a, b = mask[y, x], (mask[y + dy, x + dx] if inside else None)
                expected = (inside and a == b == 0, inside and a == b != 0, inside and a != b)
                got = (background[index, y, x], foreground[index, y, x], negative[index, y, x])
                assert got == tuple(float(e) for e in expected), (dy, dx, y, x)


def test_relation_labels_refuse_a_foreground_threshold_below_the_background_one() -> None:
    with pytest.raises(ValueError, match="bg_threshold <= fg_threshold"):
        relation_label_map(
            np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4), np.float32), np.array([0]), 0.1, 0.3
        )


@needs_crf
def test_label_crf_keeps_a_clean_label_map_and_checks_its_labels() -> None:
    mask = two_object_mask(48)
    labels = np.select([mask == 3, mask == 8], [1, 2], 0)
    image = np.stack([labels * 100] * 3, axis=-1).astype(np.uint8)  # colour edges where the labels change
    np.testing.assert_array_equal(dense_crf_labels(image, labels, 3, IRN_LABEL_CRF), labels)
    with pytest.raises(ValueError, match=r"expected labels in 0\.\.1"):
        dense_crf_labels(image, labels, 2, IRN_LABEL_CRF)


# ------------------------------------------------------------------------------------- boundary affinities


def test_path_pixels_are_the_line_from_the_pixel_to_its_partner() -> None:
    assert path_pixels((0, 3)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert path_pixels((2, 0)) == [(0, 0), (1, 0), (2, 0)]
    assert path_pixels((1, 1)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for offset in pair_offsets(6):
        pixels = path_pixels(offset)
        assert (0, 0) in pixels and offset in pixels


def test_boundary_affinities_equal_one_minus_the_path_maximum() -> None:
    torch.manual_seed(0)
    boundary = torch.rand(2, 9, 11)
    offsets = pair_offsets(4)
    affinity = boundary_affinities(boundary, offsets)
    for index, (dy, dx) in enumerate(offsets):
        for y in range(9):
            for x in range(11):
                if not (0 <= y + dy < 9 and 0 <= x + dx < 11):
                    assert torch.all(affinity[:, index, y, x] == 0)
                    continue
                path = torch.stack([boundary[:, y + ky, x + kx] for ky, kx in path_pixels((dy, dx))])
                torch.testing.assert_close(affinity[:, index, y, x], 1 - path.amax(0))


def test_a_boundary_wall_cuts_exactly_the_pairs_that_cross_it() -> None:
    boundary = torch.zeros(1, 10, 10)
    boundary[0, :, 5] = 1.0
    offsets = pair_offsets(4)
    affinity = boundary_affinities(boundary, offsets)[0]
    for index, (dy, dx) in enumerate(offsets):
        for y in range(10 - dy):
            for x in range(max(0, -dx), min(10, 10 - dx)):
                crosses = min(x, x + dx) <= 5 <= max(x, x + dx)
                assert affinity[index, y, x].item() == (0.0 if crosses else 1.0)


# --------------------------------------------------------------------------------------------------- loss


def pointing_field(mask: np.ndarray) -> torch.Tensor:
    """Displacements (2, h, w) from each foreground pixel to its object's centroid, 0 on the background."""
    field = np.zeros((2, *mask.shape), dtype=np.float32)
    for value in np.unique(mask[mask > 0]):
        ys, xs = np.nonzero(mask == value)
        field[0, ys, xs], field[1, ys, xs] = ys.mean() - ys, xs.mean() - xs
    return torch.from_numpy(field)


def test_irn_loss_is_small_for_the_true_boundary_and_field_and_large_for_wrong_ones() -> None:
    mask = two_object_mask(24)
    labels = torch.from_numpy(mask).long()[None]
    labels[0, :3] = IGNORE_LABEL  # ignored pixels take part in no pair
    offsets = pair_offsets(5)
    wall = class_boundaries(torch.from_numpy(mask))[None, None]
    good_logits, bad_logits = (wall * 2 - 1) * 20, (1 - wall * 2) * 20
    field = pointing_field(mask)[None]
    good, parts = irn_loss(good_logits, field, labels, offsets)
    bad, _ = irn_loss(bad_logits, field.flip(1), labels, offsets)
    assert parts["dp_fg"].item() < 1e-4 and parts["dp_bg"].item() < 1e-4  # the field is exact
    # Pairs across the boundary are cut, pairs inside a region are not: only pairs that merely touch
    # the one-pixel-wide wall on their own side pay.
    assert parts["neg"].item() < 1e-3
    assert good.item() < 0.5 * bad.item()


def test_irn_loss_gradients_are_finite_and_match_finite_differences() -> None:
    torch.manual_seed(1)
    offsets = pair_offsets(3)
    labels = torch.randint(0, 3, (1, 5, 6))
    labels[0, 0] = IGNORE_LABEL
    logits = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    field = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)

    def loss_of(logits: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return irn_loss(logits, field, labels, offsets)[0]

    # The boundary part is smooth away from ties of the path maximum; the displacement part is piecewise
    # linear: check the gradient where it is smooth (random values have no ties and no zero differences).
    assert torch.autograd.gradcheck(loss_of, (logits, field), eps=1e-6, atol=1e-4)
    loss_of(logits, field).backward()  # type: ignore[no-untyped-call]
    assert torch.isfinite(logits.grad).all() and torch.isfinite(field.grad).all()


def test_irn_loss_names_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"displacement of shape \(1, 2, 4, 4\)"):
        irn_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4), pair_offsets(2))
    with pytest.raises(ValueError, match="labels of shape"):
        irn_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5), pair_offsets(2))


# ----------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("backbone", ["tiny", "small"])
def test_irnet_maps_images_to_the_stride_4_grid_and_trains_only_its_branches_when_frozen(
    backbone: str,
) -> None:
    torch.manual_seed(0)
    model = build_irnet(backbone, "none", freeze_backbone=True)
    boundary, displacement = model(torch.randn(2, 3, 48, 64))
    assert boundary.shape == (2, 1, 12, 16) and displacement.shape == (2, 2, 12, 16)
    first, second = model.parameter_groups()
    assert first and second and not any(p.requires_grad for p in model.levels.parameters())
    (boundary.sum() + displacement.sum()).backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is None for p in model.levels.parameters())
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 3, 40, 64))


# ------------------------------------------------------------------------------------------ random walk


def degraded_cams(mask: np.ndarray, keys: list[int], shrink: float) -> np.ndarray:
    """Stride-4 CAMs of the mask's objects, shrunk to their cores and blurred: the peaks sit inside the
    objects, the extent is wrong (what CAMs look like)."""
    size = mask.shape[0] // IRN_STRIDE
    cams = []
    for key in keys:
        region = torch.from_numpy((mask == key + 1).astype(np.float32))[None, None]
        distance = -F.max_pool2d(-region, 2 * int(shrink) + 1, 1, int(shrink))  # erosion
        grid = F.interpolate(distance, size=(size, size), mode="area")
        blurred = F.avg_pool2d(grid, 3, 1, 1, count_include_pad=False)
        cams.append(blurred[0, 0] / blurred.max())
    return torch.stack(cams).numpy()


def test_the_walk_on_a_ground_truth_boundary_recovers_the_mask_from_degraded_cams() -> None:
    mask = two_object_mask(128)
    keys = [2, 7]
    cams = degraded_cams(mask, keys, shrink=12)
    grid_labels = torch.from_numpy(mask[IRN_STRIDE // 2 :: IRN_STRIDE, IRN_STRIDE // 2 :: IRN_STRIDE].copy())
    boundary = class_boundaries(grid_labels)
    walked = semantic_labels(
        boundary, torch.from_numpy(cams), np.array(keys), mask.shape, beta=10, exponent=8
    )
    # The CAMs alone, upsampled and thresholded like the walk's output.
    upsampled = F.interpolate(torch.from_numpy(cams)[None], scale_factor=IRN_STRIDE, mode="bilinear")[0]
    scores = torch.cat([torch.full_like(upsampled[:1], 0.2), upsampled / upsampled.max()])
    unwalked = np.array([0, 3, 8])[scores.argmax(0).numpy()]
    before, after = miou(unwalked, mask), miou(walked, mask)
    # Measured: 0.46 -> 0.84; the walk leaves the one-cell boundary ring (4 pixels here) as background.
    assert after >= 0.8, (before, after)
    assert after >= before + 0.25, (before, after)


def test_the_walk_needs_cams_on_the_stride_4_grid() -> None:
    with pytest.raises(ValueError, match=r"make_cam\.low_res_stride=4"):
        semantic_labels(torch.zeros(8, 8), torch.zeros(1, 16, 16), np.array([0]), (32, 32))
    assert semantic_labels(torch.zeros(8, 8), torch.zeros(0, 8, 8), np.array([]), (30, 32)).shape == (30, 32)
