"""eval_cam: warnings for classes never predicted and for a best threshold at the end of the sweep, the
collapse check against the baseline CAMs, and readable overlays (per image and one grid per run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import make_mini_voc, run_tiny

from clims_pipeline.config import EvalCamConfig
from clims_pipeline.metrics import ThresholdSweep
from clims_pipeline.stages.eval_cam import sweep_warnings

NAMES = ("background", "boat", "car")
THRESHOLDS = np.array([0.1, 0.2, 0.3])


def _sweep(score: float, predicted: int) -> ThresholdSweep:
    """Ground truth: a boat and a car; every pixel predicted ``predicted`` with ``score``."""
    ground_truth = np.array([[1, 1, 2, 2], [0, 0, 0, 0]])
    sweep = ThresholdSweep(3, THRESHOLDS)
    sweep.add(ground_truth, np.full((2, 4), predicted), np.full((2, 4), score))
    return sweep


def test_a_class_never_predicted_is_named() -> None:
    sweep = _sweep(0.25, predicted=1)  # car is never predicted; best threshold 0.1 or 0.2
    warnings = sweep_warnings(sweep, 1, THRESHOLDS, NAMES, EvalCamConfig())
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "class 'car' has no predicted pixel at the best threshold 0.20, nor at the lowest 0.10 "
        "(2 ground-truth pixels): its maps are empty"
    )


def test_a_best_threshold_at_an_end_of_the_sweep_is_named() -> None:
    top = sweep_warnings(_sweep(0.95, predicted=1), 2, THRESHOLDS, NAMES, EvalCamConfig())
    assert "the best background threshold 0.30 is the highest of the sweep [0.10, 0.30]" in top[-1]
    assert top[-1].endswith("widen eval_cam.threshold_max")
    low = sweep_warnings(_sweep(0.95, predicted=1), 0, THRESHOLDS, NAMES, EvalCamConfig())
    assert low[-1].endswith("widen eval_cam.threshold_min")
    assert not any(
        "sweep" in w for w in sweep_warnings(_sweep(0.95, 1), 1, THRESHOLDS, NAMES, EvalCamConfig())
    )


def test_overlays_collapse_check_and_warnings_in_a_run(tmp_path: Path) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=8, val=2)
    workdir = tmp_path / "run"
    args = ("--set=eval_cam.overlays=2", "--set=eval_cam.overlay_size=96", "--set=data.eval_split=val")
    assert run_tiny(voc, workdir, "train_cam,make_cam", "--set=make_cam.source=train_cam", *args) == 0
    assert run_tiny(voc, workdir, "train_clims,make_cam,eval_cam", *args) == 0

    result = json.loads((workdir / "results.json").read_text())["cam"]
    assert isinstance(result["warnings"], list) and isinstance(result["collapsed"], list)
    assert (
        set(result["mean_activation"]) == set(result["baseline_mean_activation"])
        and len(result["collapsed"]) <= 20
    )
    overlays = workdir / "eval_cam" / "overlays"
    pictures = sorted((overlays / "cam").glob("*.png"))
    assert len(pictures) == 2
    for path in [*pictures, overlays / "cam_grid.png"]:
        with Image.open(path) as picture:
            assert picture.height >= 96 and picture.width >= 4 * 96 * 0.5  # tiles of 96 pixels, 4 in a row
    with Image.open(overlays / "cam_grid.png") as grid, Image.open(pictures[0]) as single:
        assert grid.height > 2 * 96 and single.height > 96  # a row per image; a row per class under the first


def test_overlay_size_is_checked_before_any_stage(tmp_path: Path) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=4, val=1)
    with pytest.raises(ValueError, match=r"eval_cam\.overlay_size: expected at least 16 pixels, got 4"):
        run_tiny(voc, tmp_path / "run", "train_cam,eval_cam", "--set=eval_cam.overlay_size=4")
