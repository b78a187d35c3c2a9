"""End to end: train_cam -> train_clims -> make_cam -> eval_cam on the real VOC sample (CPU, tiny nets)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import FAST_SMOKE_ARGS, require_voc_sample, run_cli

STAGES = "train_cam,train_clims,make_cam,eval_cam"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    voc_root = require_voc_sample()
    workdir = tmp_path_factory.mktemp("pipeline_smoke")
    args = ["--voc-root", voc_root, "--workdir", workdir, "--stages", STAGES, *FAST_SMOKE_ARGS]
    assert run_cli(args) == 0
    return voc_root, workdir, STAGES


def test_models_and_logs_are_written(smoke_run: tuple[Path, Path, str]) -> None:
    _, workdir, _ = smoke_run
    for stage in ("train_cam", "train_clims"):
        assert (workdir / stage / "model.pt").is_file()
        assert not (workdir / stage / "checkpoint.pt").exists()  # removed once the final model is written
        records = [
            json.loads(line) for line in (workdir / "logs" / f"{stage}.jsonl").read_text().splitlines()
        ]
        assert records[-1]["event"] == "done"
        assert all(math.isfinite(r["loss"]) for r in records if r["event"] == "train")
    clims_log = (workdir / "logs" / "train_clims.jsonl").read_text()
    assert '"otm"' in clims_log and '"cbs"' in clims_log
    labels = json.loads((workdir / "cache" / "labels_voc_train.json").read_text())["labels"]
    assert len(labels) == 70


def test_cam_files_follow_the_irn_format(smoke_run: tuple[Path, Path, str]) -> None:
    voc_root, workdir, _ = smoke_run
    train_ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    cam_dir = workdir / "make_cam" / "train_clims"
    assert sorted(p.stem for p in cam_dir.glob("*.npy")) == sorted(train_ids)
    cls_labels = json.loads((voc_root / "cls_labels.json").read_text())
    for image_id in train_ids[:5]:
        cam = np.load(cam_dir / f"{image_id}.npy", allow_pickle=True).item()
        height, width = np.array(Image.open(voc_root / "SegmentationClass" / f"{image_id}.png")).shape
        assert list(cam["keys"]) == [k - 1 for k in cls_labels[image_id]]  # positive classes, 0-based
        assert cam["high_res"].shape == (len(cam["keys"]), height, width)
        assert cam["cam"].shape == (len(cam["keys"]), math.ceil(height / 4), math.ceil(width / 4))
        assert cam["high_res"].dtype == np.float32
        assert cam["high_res"].min() >= 0.0 and cam["high_res"].max() <= 1.0


def test_results_json_and_overlays(smoke_run: tuple[Path, Path, str]) -> None:
    _, workdir, _ = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    cam = results["cam"]
    assert 0.0 <= cam["miou"] <= 100.0
    assert 0.0 < cam["threshold"] < 1.0
    assert len(cam["per_class"]) == 21 and "background" in cam["per_class"]
    assert cam["split"] == "train" and cam["images"] == 70 and cam["source"] == "train_clims"
    assert max(cam["miou_by_threshold"].values()) == pytest.approx(cam["miou"], abs=0.01)
    assert "mIoU" in (workdir / "eval_cam" / "cam_table.md").read_text()
    overlays = sorted((workdir / "eval_cam" / "overlays" / "cam").glob("*.png"))
    assert len(overlays) == 4
    for path in overlays:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"


def test_rerun_skips_finished_work(
    smoke_run: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    voc_root, workdir, stages = smoke_run
    model_mtime = (workdir / "train_cam" / "model.pt").stat().st_mtime_ns
    before = json.loads((workdir / "results.json").read_text())["cam"]["miou"]
    assert run_cli(["--voc-root", voc_root, "--workdir", workdir, "--stages", stages, *FAST_SMOKE_ARGS]) == 0
    out = capsys.readouterr().out
    assert "[train_cam] done already" in out and "[train_clims] done already" in out
    assert "other settings" not in out
    assert "70 of 70 images done already" in out
    assert (workdir / "train_cam" / "model.pt").stat().st_mtime_ns == model_mtime
    assert json.loads((workdir / "results.json").read_text())["cam"]["miou"] == before


def test_baseline_cams_get_their_own_results_key(smoke_run: tuple[Path, Path, str]) -> None:
    voc_root, workdir, _ = smoke_run
    assert (
        run_cli(
            [
                "--voc-root",
                voc_root,
                "--workdir",
                workdir,
                "--stages",
                "make_cam,eval_cam",
                "--cam-source",
                "train_cam",
                *FAST_SMOKE_ARGS,
                "--set",
                "make_cam.scales=[0.5]",
                "--set",
                "make_cam.flip=false",
            ]
        )
        == 0
    )
    results = json.loads((workdir / "results.json").read_text())
    assert {"cam", "cam_baseline"} <= results.keys()  # merged, the CLIMS result kept
    assert results["cam_baseline"]["source"] == "train_cam"


def test_documented_smoke_command_under_torchrun(tmp_path: Path) -> None:
    from pipeline_helpers import run_subprocess

    voc_root = require_voc_sample()
    args = ["--voc-root", voc_root, "--stages", STAGES, "--preset", "smoke", "--workdir", tmp_path / "w"]
    result = run_subprocess(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stdout and "| **mIoU** |" in result.stdout
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["cam"]["images"] == 70
