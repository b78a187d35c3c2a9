"""Refinement and segmentation end to end: train_aff -> make_rw -> train_seg -> eval_seg -> report, on
real VOC images.

The default test runs every stage (``--stages all``) on 4 train + 3 val images of the VOC sample with tiny
networks; the random walk and the CRF run on the real image sizes. The ``slow`` test is the acceptance
command on the whole 100-image sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import FAST_SMOKE_ARGS, make_mini_voc, require_voc_sample, run_cli

from clims_pipeline.crf import crf_available

TINY_BATCHES = (
    *("--set", "train_cam.batch_size=2", "--set", "train_clims.train.batch_size=2"),
    *("--set", "train_aff.train.batch_size=2", "--set", "train_seg.train.batch_size=2"),
    *("--set", "train_seg.train.max_steps=2", "--set", "eval_seg.scales=[1.0]"),
)


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not crf_available():
        pytest.skip("pydensecrf2 missing (pip install 'clims-loss[crf]'); the smoke preset runs the CRF")
    voc_root = make_mini_voc(tmp_path_factory.mktemp("voc"), train=4, val=3)
    # Two val images stand in for the test split (no masks needed) to exercise the submission layout.
    val_ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (voc_root / "ImageSets" / "Segmentation" / "test.txt").write_text("".join(f"{i}\n" for i in val_ids[:2]))
    workdir = tmp_path_factory.mktemp("part2")
    args = ["--voc-root", voc_root, "--workdir", workdir, "--stages", "all", *FAST_SMOKE_ARGS, *TINY_BATCHES]
    assert run_cli(args) == 0
    return voc_root, workdir


def test_results_have_cam_rw_and_seg(mini_run: tuple[Path, Path]) -> None:
    _, workdir = mini_run
    results = json.loads((workdir / "results.json").read_text())
    for key in ("cam", "rw", "seg"):
        assert 0.0 <= results[key]["miou"] <= 100.0
        assert len(results[key]["per_class"]) == 21
    rw, seg = results["rw"], results["seg"]
    assert rw["split"] == "train" and rw["images"] == 4
    assert (rw["beta"], rw["exponent"], rw["crf"]) == (10.0, 5, True)
    assert seg["split"] == "val" and seg["images"] == 3 and seg["crf"] is True
    assert seg["miou_crf"] is not None and seg["miou_no_crf"] is not None
    assert seg["test_submission"]["images"] == 2
    markdown = (workdir / "results.md").read_text()
    for expected in ("56.6", "70.5", "69.3", "+RW", "DeepLabV2 val", f"{rw['miou']:.2f}"):
        assert expected in markdown
    assert "preset `smoke`" in markdown and "plumbing check" in markdown  # the caveat of this preset


def test_report_caveat_names_each_preset() -> None:
    from clims_pipeline.config import PRESETS
    from clims_pipeline.stages.report import PRESET_CAVEATS

    assert set(PRESET_CAVEATS) == set(PRESETS)
    assert "toy world" in PRESET_CAVEATS["toy"] and "smoke" not in PRESET_CAVEATS["toy"]


def test_pseudo_masks_are_palette_pngs_at_image_size(mini_run: tuple[Path, Path]) -> None:
    voc_root, workdir = mini_run
    train_ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for image_id in train_ids:
        with Image.open(workdir / "make_rw" / "masks" / f"{image_id}.png") as mask:
            assert mask.mode == "P"
            labels = np.array(mask)
        with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as image:
            assert labels.shape == (image.height, image.width)
        assert set(np.unique(labels)) <= set(range(21))
        with Image.open(workdir / "train_aff" / "labels" / f"{image_id}.png") as affinity_labels:
            assert set(np.unique(np.array(affinity_labels))) <= {*range(21), 255}


def test_submission_layout(mini_run: tuple[Path, Path]) -> None:
    voc_root, workdir = mini_run
    test_ids = (voc_root / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
    submission = (
        workdir / "eval_seg" / "submission" / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    )
    assert sorted(p.stem for p in submission.glob("*.png")) == sorted(test_ids)


def test_rerun_resumes_without_redoing_work(
    mini_run: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    voc_root, workdir = mini_run
    mask = (
        workdir
        / "make_rw"
        / "masks"
        / f"{(voc_root / 'ImageSets/Segmentation/train.txt').read_text().split()[0]}.png"
    )
    before = (mask.stat().st_mtime_ns, (workdir / "train_seg" / "model.pt").stat().st_mtime_ns)
    args = ["--voc-root", voc_root, "--workdir", workdir, "--stages", "all", *FAST_SMOKE_ARGS, *TINY_BATCHES]
    assert run_cli(args) == 0
    after = (mask.stat().st_mtime_ns, (workdir / "train_seg" / "model.pt").stat().st_mtime_ns)
    assert before == after
    output = capsys.readouterr().out
    assert "[train_aff] done already" in output and "4 of 4 pseudo masks done already" in output


@pytest.mark.slow
def test_acceptance_command_on_the_whole_sample(tmp_path: Path) -> None:
    """The issue's acceptance command: every stage on the 100-image VOC sample, smoke preset."""
    voc_root = require_voc_sample()
    if not crf_available():
        pytest.skip("pydensecrf2 missing")
    assert (
        run_cli(["--voc-root", voc_root, "--stages", "all", "--preset", "smoke", "--workdir", tmp_path]) == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"cam", "rw", "seg"} <= set(results)
    assert results["rw"]["images"] == 70 and results["seg"]["images"] == 30
    assert (tmp_path / "results.md").is_file()
