"""Units of refinement and segmentation: random walk, affinity labels, dense CRF, DeepLabV2, ASPP, MSC
(CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clims_pipeline.crf import CRF_INSTALL_HINT, DEEPLAB_CRF, PSA_CRF, crf_available, dense_crf
from clims_pipeline.deeplab import ASPP, MSC, DeepLabV2, build_deeplab, msc_loss
from clims_pipeline.random_walk import (
    affinity_label_masks,
    affinity_loss,
    confident_label_map,
    downsample_labels,
    pair_affinities,
    pair_offsets,
    random_walk,
    transition_matrix,
)

needs_crf = pytest.mark.skipif(not crf_available(), reason=f"pydensecrf2 missing: {CRF_INSTALL_HINT}")


def two_region_features(height: int = 12, width: int = 16, border: int = 8) -> torch.Tensor:
    """Constant features left of ``border`` and very different ones right of it: affinity 1 inside a
    region, exp(-1000) = 0 across the border."""
    features = torch.zeros(4, height, width)
    features[:, :, border:] = 1000.0
    return features


def test_pair_offsets_cover_each_unordered_pair_once() -> None:
    offsets = pair_offsets(5)
    assert len(offsets) == len(set(offsets)) == 34
    assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)
    assert not any((-dy, -dx) in offsets for dy, dx in offsets)


def test_transition_matrix_is_row_stochastic() -> None:
    torch.manual_seed(0)
    offsets = pair_offsets(4)
    affinity = pair_affinities(torch.randn(1, 8, 9, 11), offsets)[0]
    transition = transition_matrix(affinity, offsets, beta=10).to_dense()
    assert transition.shape == (99, 99)
    assert torch.all(transition >= 0)
    torch.testing.assert_close(transition.sum(dim=1), torch.ones(99, dtype=torch.float64))


def test_a_seed_spreads_over_its_region_and_not_across_a_zero_affinity_border() -> None:
    offsets = pair_offsets(3)
    height, width, border = 12, 16, 8
    affinity = pair_affinities(two_region_features(height, width, border)[None], offsets)[0]
    transition = transition_matrix(affinity, offsets, beta=8)
    seed = torch.zeros(1, height, width)
    seed[0, 5, 3] = 1.0
    walked = random_walk(seed, transition, steps=256)[0]
    left, right = walked[:, :border], walked[:, border:]
    assert right.abs().max() < 1e-12  # nothing crosses the border
    assert left.min() > 0  # the whole region is reached
    # A long walk on a connected region tends to a flat map (up to the degree differences at its edges).
    assert left.max() / left.min() < 2.0
    assert walked.sum() == pytest.approx(left.sum().item())


def test_affinity_labels_and_loss() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 2]]])
    offsets = [(0, 1), (1, 0)]
    background, foreground, negative = affinity_label_masks(labels, offsets)
    assert background[0, 0, 0, 0] == 1  # (0,0)-(0,1): background pair
    assert foreground[0, 0, 0, 2] == 1  # (0,2)-(0,3): class 1 pair
    assert negative[0, 0, 0, 1] == 1  # (0,1)-(0,2): background vs class 1
    assert negative[0, 0, 1, 2] == 1  # (1,2)-(1,3): class 1 vs class 2
    assert background[0, 1, 0, 1] == foreground[0, 1, 0, 1] == negative[0, 1, 0, 1] == 0  # ignored node
    assert negative[0, 0, :, 3].sum() == 0  # pairs leaving the grid carry no label
    perfect = (background + foreground).clamp(max=1.0)  # affinity 1 on positives, 0 on negatives
    loss, parts = affinity_loss(perfect, labels, offsets)
    assert loss.item() < 1e-3 and set(parts) == {"bg", "fg", "neg"}
    wrong, _ = affinity_loss(1 - perfect, labels, offsets)
    assert wrong.item() > 5


def test_downsample_labels_takes_the_block_mode() -> None:
    labels = torch.full((1, 16, 16), 255)
    labels[0, :8, :8] = 3
    labels[0, :8, 8:] = 0
    labels[0, 8:, :8] = 0
    labels[0, 8:, :5] = 2  # 5 of 8 columns: the mode of that block
    assert downsample_labels(labels, 8, 21)[0].tolist() == [[3, 0], [2, 255]]


def test_confident_label_map_without_crf() -> None:
    cams = np.zeros((1, 8, 8), dtype=np.float32)
    cams[0, 2:6, 2:6] = 1.0  # certain object
    cams[0, 0, :] = 0.1  # uncertain: 0.9^4 > 0.1 (background at power 4), 0.9^32 < 0.1 (foreground at 32)
    labels = confident_label_map(np.zeros((8, 8, 3), np.uint8), cams, np.array([6]), crf=None)
    assert (labels[2:6, 2:6] == 7).all()
    assert (labels[0] == 255).all()
    assert labels[7, 7] == 0


@needs_crf
def test_crf_marginals_are_distributions() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    marginals = dense_crf(image, rng.random((3, 20, 30)).astype(np.float32), PSA_CRF)
    assert marginals.shape == (3, 20, 30) and marginals.dtype == np.float32
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-4)


@needs_crf
def test_crf_moves_a_blurred_boundary_to_the_image_edge() -> None:
    height, width, edge = 40, 60, 30
    image = np.zeros((height, width, 3), np.uint8)
    image[:, edge:] = 255
    # Scores whose boundary is smeared and shifted 6 pixels left of the true edge.
    columns = np.arange(width, dtype=np.float32)
    foreground = 1 / (1 + np.exp(-(columns - (edge - 6)) / 3.0))
    probabilities = np.stack([1 - foreground, foreground])[:, None, :].repeat(height, axis=1)
    before = probabilities.argmax(axis=0)
    after = dense_crf(image, probabilities, DEEPLAB_CRF).argmax(axis=0)
    truth = (columns >= edge)[None].repeat(height, axis=0)
    assert (before != truth).sum() > 0
    assert (after == truth).all()
    # Only labels near the edge change; far from it the prediction is the same.
    changed_columns = np.nonzero((before != after).any(axis=0))[0]
    assert changed_columns.min() >= edge - 10 and changed_columns.max() < edge + 10


def test_missing_crf_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("pydensecrf"):
            raise ImportError("no pydensecrf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"clims-loss\[crf\]"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 4), np.float32))


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (100, 75), (321, 321)])
def test_deeplab_output_stride_8(size: tuple[int, int]) -> None:
    model = build_deeplab(21, backbone="tiny", weights="none").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 21, -(-size[0] // 8), -(-size[1] // 8))


@pytest.mark.parametrize("size", [(64, 64), (65, 97)])
def test_toy_deeplab_output_stride_4_and_its_rates(size: tuple[int, int]) -> None:
    model = build_deeplab(7, backbone="small", weights="none").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 7, -(-size[0] // 4), -(-size[1] // 4))
    assert [branch.dilation[0] for branch in model.base.aspp.branches] == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="'small'"):
        DeepLabV2(7, backbone="smalll", weights="none")


def test_resnet101_deeplab_shape() -> None:
    model = DeepLabV2(21, backbone="resnet101", weights="none").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 81)).shape == (1, 21, 9, 11)
    assert [branch.dilation for branch in model.aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_aspp_sums_its_branches() -> None:
    aspp = ASPP(8, 3, rates=(2, 4))
    x = torch.randn(1, 8, 10, 10)
    torch.testing.assert_close(aspp(x), aspp.branches[0](x) + aspp.branches[1](x))


def test_msc_fuses_by_max_and_trains_on_every_output() -> None:
    torch.manual_seed(0)
    model = MSC(DeepLabV2(5, backbone="tiny", weights="none"), scales=(0.5, 0.75))
    images = torch.randn(2, 3, 64, 80)
    model.train()
    outputs = model(images)
    assert len(outputs) == 4 and all(o.shape == (2, 5, 8, 10) for o in outputs)
    torch.testing.assert_close(outputs[-1], torch.stack(outputs[:3]).amax(dim=0))
    model.eval()
    torch.testing.assert_close(model(images), outputs[-1])
    labels = torch.randint(0, 5, (2, 64, 80))
    labels[:, :10] = 255
    loss = msc_loss(outputs, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0


def test_msc_loss_is_the_mean_over_labelled_pixels_and_zero_without_any() -> None:
    torch.manual_seed(0)
    outputs = [torch.randn(2, 5, 8, 10) for _ in range(3)]
    labels = torch.randint(0, 5, (2, 64, 80))
    labels[0, :40] = 255
    resized = labels[:, ::8, ::8]  # nearest resize of a 8x exact multiple
    expected = sum(F.cross_entropy(o, resized, ignore_index=255) for o in outputs)
    torch.testing.assert_close(msc_loss(outputs, labels), expected)
    assert msc_loss(outputs, torch.full_like(labels, 255)).item() == 0.0  # not NaN
