"""Pipeline metrics and file helpers: the one-pass threshold sweep, atomic writes, results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pipeline_helpers  # noqa: F401  (puts examples/ on sys.path)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# isort: split
from clims_pipeline.files import atomic_write, update_results
from clims_pipeline.metrics import ThresholdSweep, confusion_matrix, iou_from_confusion, mean_iou
from clims_pipeline.presets import apply_override, build_config


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), num_labels=st.integers(2, 6))
def test_threshold_sweep_equals_one_confusion_matrix_per_threshold(seed: int, num_labels: int) -> None:
    rng = np.random.default_rng(seed)
    thresholds = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    sweep = ThresholdSweep(num_labels, thresholds)
    images = []
    for _ in range(3):
        gt = rng.integers(0, num_labels, size=(7, 9))
        gt[rng.random(gt.shape) < 0.1] = 255
        cls = rng.integers(1, num_labels, size=gt.shape)
        # scores on the threshold grid too, to pin down the strict ">" at ties
        score = np.where(
            rng.random(gt.shape) < 0.3, rng.choice(thresholds, size=gt.shape), rng.random(gt.shape)
        )
        sweep.add(gt, cls, score)
        images.append((gt, cls, score))
    for index, threshold in enumerate(thresholds):
        brute = sum(
            confusion_matrix(gt, np.where(score > threshold, cls, 0), num_labels) for gt, cls, score in images
        )
        np.testing.assert_array_equal(sweep.confusion_at(index), brute)


def test_iou_of_a_known_confusion_matrix() -> None:
    confusion = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]])
    iou = iou_from_confusion(confusion)
    np.testing.assert_allclose(iou[:2], [3 / 5, 2 / 4])
    assert np.isnan(iou[2])  # absent from ground truth and prediction: left out of the mean
    assert mean_iou(iou) == pytest.approx((0.6 + 0.5) / 2)


def test_atomic_write_leaves_no_partial_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing_writer(file) -> None:  # type: ignore[no-untyped-def]
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, failing_writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_update_results_merges_keys(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    update_results(path, {"cam": {"miou": 50.0}})
    merged = update_results(path, {"rw": {"miou": 60.0}})
    assert merged == {"cam": {"miou": 50.0}, "rw": {"miou": 60.0}} == json.loads(path.read_text())


def test_config_overrides_are_checked() -> None:
    config = build_config("full", "official", "voc")
    assert config.train_clims.prompts == "voc-official" and config.train_clims.train.epochs == 15
    assert build_config("full", "paper", "voc").train_clims.train.schedule == "cosine"
    apply_override(config, "make_cam.scales=[1.0, 0.5]")
    assert config.make_cam.scales == (1.0, 0.5)
    with pytest.raises(ValueError, match="epoch"):
        apply_override(config, "train_cam.epoch=3")
