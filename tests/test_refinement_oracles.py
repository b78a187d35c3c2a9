"""Oracle checks of the refinement stages: the random walk with ground-truth affinities, AffinityNet's
output strides, ground-truth affinity labels; and (slow) the oracle benchmark's floors on a toy run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from clims_pipeline.config import MakeRWConfig
from clims_pipeline.random_walk import (
    AffinityNet,
    build_affinity_net,
    ground_truth_affinity_features,
    pair_affinities,
    pair_offsets,
    random_walk_labels,
)


def square_mask(size: int = 32, top: int = 8, side: int = 16, label: int = 2) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, top : top + side] = label
    return mask


@pytest.mark.parametrize("stride", [4, 8])
def test_ground_truth_affinities_are_one_inside_a_label_and_small_across(stride: int) -> None:
    mask = square_mask()
    features = ground_truth_affinity_features(mask, num_labels=3, stride=stride, contrast=5.0)
    assert features.shape == (3, 32 // stride, 32 // stride)
    affinity = pair_affinities(features[None], [(0, 1)])[0, 0]
    inside = 8 // stride  # first object node; the node before it is background
    assert affinity[inside + 1, inside].item() == pytest.approx(1.0)  # object - object
    assert affinity[0, 0].item() == pytest.approx(1.0)  # background - background
    assert affinity[inside, inside - 1].item() == pytest.approx(math.exp(-10.0), rel=1e-4)  # across


def test_ground_truth_affinities_leave_void_out_and_check_labels() -> None:
    mask = square_mask()
    mask[8:16, 8:16] = 255  # a void block inside the object: its node takes no label
    features = ground_truth_affinity_features(mask, num_labels=3, stride=8)
    assert features[:, 1, 1].sum().item() == 0.0
    with pytest.raises(ValueError, match="num_labels=3"):
        ground_truth_affinity_features(square_mask(label=5), num_labels=3)


# Stride 4 only: at stride 8 the 16-pixel object is 2 x 2 nodes, whose bilinear upsampling rounds its corners.
@pytest.mark.parametrize("stride", [4])
def test_a_walk_with_ground_truth_affinities_fills_the_object_from_most_of_its_cam(stride: int) -> None:
    """The oracle's premise: with correct affinities the walk spreads a CAM that covers three quarters of
    the object over the whole object and not beyond (grid-aligned object). Only the one-pixel rim where the
    bilinear upsampling of the walked grid mixes an object node with a background node (stride / 4 pixels
    wide) may differ; a CAM
    on a quarter of the object cannot win, since PSA's background score is walked over the object too."""
    import scipy.ndimage

    mask = square_mask()
    cams = np.zeros((1, 32, 32), dtype=np.float32)
    cams[0, 8:24, 8:20] = 1.0  # the object's left three quarters
    features = ground_truth_affinity_features(mask, num_labels=3, stride=stride)
    config = MakeRWConfig(beta=10.0, exponent=6, background_power=16.0, radius=3, crf=False)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    labels = random_walk_labels(image, cams, np.array([1]), features, config, stride)
    width = stride // 4
    square = np.ones((3, 3), dtype=bool)
    rim = scipy.ndimage.binary_dilation(mask == 2, square, iterations=width) & ~scipy.ndimage.binary_erosion(
        mask == 2, square, iterations=width
    )
    assert (labels[~rim] == mask[~rim]).all()
    missed = (mask == 2) & ~rim & (cams[0] == 0)
    assert missed.any() and (labels[missed] == 2).all()  # what the CAM missed is filled
    cam_alone = np.where(cams[0] > 0.5, 2, 0)
    assert (cam_alone != mask).sum() == 16 * 4  # the CAM alone misses a quarter, which the walk fills


def test_tiny_affinity_net_at_stride_4_and_8() -> None:
    images = torch.randn(2, 3, 64, 48)
    assert build_affinity_net("tiny", "none", 4)(images).shape[-2:] == (16, 12)
    assert build_affinity_net("tiny", "none")(images).shape[-2:] == (8, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_affinity_net("tiny", "none", 4)(torch.randn(1, 3, 62, 64))
    with pytest.raises(ValueError, match="feature_stride=4"):
        AffinityNet("resnet50", "none", stride=4)
    with pytest.raises(ValueError, match="feature_stride=2"):
        build_affinity_net("tiny", "none", 2)


def test_pair_offsets_are_the_same_on_any_grid() -> None:
    """The radius counts grid nodes: at stride 4 it spans half the pixels it spans at stride 8."""
    assert len(pair_offsets(5)) == 34


# ------------------------------------------------------------------------------------------------------
# slow: the oracle benchmark's walk rows on a generated toy world, with CAMs made from the masks


BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "refinement_oracles.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("refinement_oracles", BENCH_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("stride", [8, 4])
def test_walk_oracle_recovers_degraded_cams_on_the_toy_world(tmp_path: Path, stride: int) -> None:
    """CAMs that are the masks blurred by 3 px (peaks 1) then degraded by the benchmark (blur, erosion,
    shift): the walk with ground-truth affinities must gain on every one, and the grid ceiling must show the
    stride's resolution limit. Floors from the toy world (60 images), with margin."""
    from clims_pipeline.config import build_config
    from clims_pipeline.data import build_source
    from clims_pipeline.plugins import load_plugins
    from clims_pipeline.toy.world import generate_toy_world

    load_plugins()
    bench = load_bench()
    root = tmp_path / "toyworld"
    generate_toy_world(root, n_train=60, n_val=10, n_background_only=0, progress=False)
    source = build_source("toy", str(root), tmp_path / "cache")
    config = build_config("toy", dataset="toy")
    config.train_aff.feature_stride = stride
    config.make_rw.crf = False

    def mask_cams(image_id: str) -> dict[str, np.ndarray]:
        mask = source.load_mask(image_id)
        keys = np.array([k - 1 for k in np.unique(mask) if 0 < k < 255], dtype=np.int64)
        maps = (
            np.stack([(mask == k + 1).astype(np.float32) for k in keys])
            if len(keys)
            else np.zeros((0, *mask.shape), dtype=np.float32)
        )
        return {"high_res": bench.blurred(maps) if len(keys) else maps, "keys": keys}

    rows = bench.walk_oracle_rows(config, source, mask_cams, source.ids("train_aug"))
    values = {name: value for name, value, _ in rows}
    ceiling = values[f"grid ceiling: masks pooled to the stride-{stride} grid and upsampled"]
    assert ceiling >= (75.0 if stride == 4 else 55.0)
    gains = {name: rows[2 + 2 * i][1] - rows[1 + 2 * i][1] for i, name in enumerate(bench.DEGRADATIONS)}
    assert len(rows) == 1 + 2 * len(bench.DEGRADATIONS)
    # Blurred or shifted CAMs: the masks' affinities pull the scores back inside the objects. Shrunk ones are
    # left out: PSA's background score (1 - max CAM)^16 outweighs an eroded CAM over most of the object.
    assert gains["blurred (sigma 3 px)"] >= 3.0, rows
    assert gains["shifted (6 px right, 6 down)"] >= 3.0, rows
    assert max(value for _, value, _ in rows[1:]) <= ceiling + 1.0
