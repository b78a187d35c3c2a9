"""IRNet end to end on real VOC images: ``--stages all --variant official`` runs train_irn -> make_sem_seg and
trains the segmentation on IRNet's pseudo masks; ``results.json`` gets ``irn``.

The default test runs every stage on 4 train + 3 val images of the VOC sample with tiny networks (the label
CRF and the random walk run on the real image sizes); the ``slow`` one is the acceptance command on the
whole 100-image sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import FAST_SMOKE_ARGS, make_mini_voc, require_voc_sample, run_cli

from clims_pipeline.cli import selected_stage_names
from clims_pipeline.config import build_config
from clims_pipeline.crf import crf_available

TINY = (
    *("--set", "train_cam.batch_size=2", "--set", "train_clims.train.batch_size=2"),
    *("--set", "train_irn.train.batch_size=2", "--set", "train_seg.train.batch_size=2"),
    *(
        "--set",
        "train_seg.train.max_steps=2",
        "--set",
        "eval_seg.scales=[1.0]",
        "--set",
        "eval_seg.crf=false",
    ),
)


def official_args(voc_root: Path, workdir: Path) -> list[object]:
    return ["--voc-root", voc_root, "--workdir", workdir, "--stages", "all", "--variant", "official",
            *FAST_SMOKE_ARGS, *TINY]  # fmt: skip


@pytest.fixture(scope="module")
def official_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not crf_available():
        pytest.skip(
            "pydensecrf2 missing (pip install 'clims-loss[crf]'); the smoke preset's IRNet labels use the CRF"
        )
    voc_root = make_mini_voc(tmp_path_factory.mktemp("voc"), train=4, val=3)
    workdir = tmp_path_factory.mktemp("official")
    assert run_cli(official_args(voc_root, workdir)) == 0
    return voc_root, workdir


def test_stages_all_runs_the_chosen_refiner_and_both_when_the_preset_compares() -> None:
    def refiners(config: object) -> set[str]:
        return set(selected_stage_names("all", config)) & {
            "train_aff",
            "make_rw",
            "train_irn",
            "make_sem_seg",
        }

    paper, official = build_config("smoke", "paper"), build_config("smoke", "official")
    assert (paper.refine.method, official.refine.method) == ("psa", "irn")
    assert refiners(paper) == {"train_aff", "make_rw"}
    assert refiners(official) == {"train_irn", "make_sem_seg"}
    official.refine.compare = True
    assert refiners(official) == {"train_aff", "make_rw", "train_irn", "make_sem_seg"}
    assert build_config("toy", "paper", "toy").refine.compare  # the toy main command prints both


def test_official_run_writes_irn_and_trains_the_segmentation_on_its_masks(
    official_run: tuple[Path, Path],
) -> None:
    _, workdir = official_run
    results = json.loads((workdir / "results.json").read_text())
    assert {"cam", "irn", "seg"} <= set(results) and "rw" not in results
    irn = results["irn"]
    assert 0.0 <= irn["miou"] <= 100.0 and len(irn["per_class"]) == 21
    assert irn["split"] == "train" and irn["images"] == 4
    assert (irn["beta"], irn["exponent"], irn["background_threshold"]) == (10.0, 5, 0.2)
    assert irn["relation_labels"] == {"thresholds": [0.3, 0.1], "crf": True}
    assert results["seg"]["mask_source"] == "make_sem_seg"
    assert json.loads((workdir / "make_sem_seg" / "result_irn.json").read_text()) == irn  # rebuilds results
    markdown = (workdir / "results.md").read_text()
    for expected in ("+IRNet", f"{irn['miou']:.2f}", "74.1", "58.6", "70.5", "variant `official`"):
        assert expected in markdown


def test_irn_labels_and_masks_are_palette_pngs_at_image_size(official_run: tuple[Path, Path]) -> None:
    voc_root, workdir = official_run
    train_ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for image_id in train_ids:
        with Image.open(workdir / "make_sem_seg" / "masks" / f"{image_id}.png") as mask:
            assert mask.mode == "P"
            labels = np.array(mask)
        with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as image:
            assert labels.shape == (image.height, image.width)
        assert set(np.unique(labels)) <= set(range(21))
        with Image.open(workdir / "train_irn" / "labels" / f"{image_id}.png") as relation_labels:
            assert set(np.unique(np.array(relation_labels))) <= {*range(21), 255}


def test_rerun_resumes_without_redoing_work(
    official_run: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    voc_root, workdir = official_run
    model = workdir / "train_irn" / "model.pt"
    before = model.stat().st_mtime_ns
    assert run_cli(official_args(voc_root, workdir)) == 0
    assert model.stat().st_mtime_ns == before
    output = capsys.readouterr().out
    assert "[train_irn] done already" in output and "4 of 4 pseudo masks done already" in output


def test_changed_walk_settings_redo_the_masks_but_not_the_network(
    official_run: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    voc_root, workdir = official_run
    model = workdir / "train_irn" / "model.pt"
    before = model.stat().st_mtime_ns
    stages = ["--stages", "train_irn,make_sem_seg", "--set", "make_sem_seg.background_threshold=0.3"]
    assert (
        run_cli(
            [*official_args(voc_root, workdir)[:4], *stages, "--variant", "official", *FAST_SMOKE_ARGS, *TINY]
        )
        == 0
    )
    assert model.stat().st_mtime_ns == before
    output = capsys.readouterr().out
    assert "background_threshold" in output and "0 of 4 pseudo masks done already" in output
    assert json.loads((workdir / "results.json").read_text())["irn"]["background_threshold"] == 0.3


@pytest.mark.slow
def test_official_acceptance_command_on_the_whole_sample(tmp_path: Path) -> None:
    """``--stages all --preset smoke --variant official`` on the 100-image VOC sample."""
    voc_root = require_voc_sample()
    if not crf_available():
        pytest.skip("pydensecrf2 missing")
    args = ["--voc-root", voc_root, "--stages", "all", "--preset", "smoke", "--variant", "official"]
    assert run_cli([*args, "--workdir", tmp_path]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"cam", "irn", "seg"} <= set(results)
    assert results["irn"]["images"] == 70 and results["seg"]["images"] == 30
    assert results["seg"]["mask_source"] == "make_sem_seg"
