"""Per-image outputs carry their size and sha256 in their stage's manifest: skipping goes by size (stat only),
reading checks both. A truncated CAM file is recomputed (by name) when make_cam reruns and named with the
stage to rerun when eval_cam reads it; a file with flipped bytes of the same size is named by every stage that
reads it (CAMs, affinity labels, pseudo masks, segmentation predictions), with what to do."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import make_mini_voc, run_tiny

from clims_pipeline.cams import load_cam_file
from clims_pipeline.files import DamagedFileError, sha256_file

#: The refinement stages at their smallest, without the dense CRF (not what these tests are about).
REFINEMENT_ARGS = (
    "--cam-source=train_cam",
    "--set=train_aff.train.max_steps=1",
    "--set=train_aff.train.batch_size=2",
    "--set=train_aff.crop_size=32",
    "--set=train_aff.crf=false",
    "--set=make_rw.crf=false",
    "--set=train_seg.train.max_steps=1",
    "--set=train_seg.train.batch_size=2",
    "--set=eval_seg.scales=[1.0]",
    "--set=eval_seg.crf=false",
)
ALL_STAGES = "train_cam,make_cam,train_aff,make_rw,train_seg,eval_seg"


def _run(voc: Path, workdir: Path, stages: str) -> int:
    return run_tiny(voc, workdir, stages, *REFINEMENT_ARGS)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A mini VOC set and a workdir in which every stage that writes per-image files has run."""
    voc = make_mini_voc(tmp_path_factory.mktemp("voc"), train=4, val=1)
    workdir = tmp_path_factory.mktemp("run") / "w"
    assert _run(voc, workdir, ALL_STAGES) == 0
    return voc, workdir


def _copy(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    voc, workdir = finished
    return voc, Path(shutil.copytree(workdir, tmp_path / "w"))


def _flip_a_byte(path: Path) -> None:
    """Damage ``path`` as a bad disk or copy does, keeping its size (a size check cannot see it)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


PER_IMAGE_OUTPUTS = {
    "make_cam": "make_cam/train_cam",
    "train_aff": "train_aff/labels",
    "make_rw": "make_rw/masks",
    "eval_seg": "eval_seg/predictions",
}


def test_every_per_image_output_records_its_files_sizes_and_hashes(finished: tuple[Path, Path]) -> None:
    _, workdir = finished
    for stage, folder in PER_IMAGE_OUTPUTS.items():
        directory = workdir / folder
        manifest = json.loads((directory / "manifest.json").read_text())
        files = sorted(p for p in directory.rglob("*") if p.suffix in (".npy", ".png"))
        assert files, stage
        keys = [path.relative_to(directory).as_posix() for path in files]
        assert manifest["sizes"] == {key: path.stat().st_size for key, path in zip(keys, files, strict=True)}
        assert manifest["sha256"] == {key: sha256_file(path) for key, path in zip(keys, files, strict=True)}
    # eval_seg's predictions sit one level down, in <split>/.
    assert all(
        key.startswith("val/")
        for key in json.loads((workdir / "eval_seg/predictions/manifest.json").read_text())["sizes"]
    )


def _damaged(path: Path, manifest: Path, stage: str) -> str:
    return (
        re.escape(f"{path} is damaged: its sha256 is ")
        + re.escape(f"{sha256_file(path)}, but {manifest} recorded ")
        + f"[0-9a-f]{{64}} when {stage} wrote it; "
        + re.escape(f"delete it and rerun stage {stage} to recompute it alone, or rerun {stage} with --force")
    )


@pytest.mark.parametrize(
    ("folder", "stage", "reader"),
    [
        (
            "make_cam/train_cam",
            "make_cam",
            "make_rw",
        ),  # the CAMs of a training image, read by the random walk
        ("train_aff/labels", "train_aff", "train_aff"),  # affinity labels, read by AffinityNet's training
        ("make_rw/masks", "make_rw", "train_seg"),  # pseudo masks, read by DeepLab's training
        ("eval_seg/predictions/val", "eval_seg", "eval_seg"),  # predictions, read by the mIoU
    ],
)
def test_a_per_image_file_with_flipped_bytes_is_named_by_its_reader(
    finished: tuple[Path, Path], tmp_path: Path, folder: str, stage: str, reader: str
) -> None:
    voc, workdir = _copy(finished, tmp_path)
    damaged = sorted((workdir / folder).glob("*.[np][pn][yg]"))[0]
    _flip_a_byte(damaged)
    # Take away what the reader made of the file, so that it reads it again.
    if reader in ("train_aff", "train_seg"):
        (workdir / reader / "model.pt").unlink()
    elif reader == "make_rw":
        (workdir / "make_rw" / "masks" / f"{damaged.stem}.png").unlink()
    manifest = workdir / PER_IMAGE_OUTPUTS[stage] / "manifest.json"
    with pytest.raises(DamagedFileError, match=_damaged(damaged, manifest, stage)):
        _run(voc, workdir, reader)


def test_a_truncated_cam_file_is_recomputed_by_make_cam_and_named_by_eval_cam(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=8, val=1)
    workdir = tmp_path / "w"
    assert _run(voc, workdir, "train_cam,make_cam") == 0
    cam_dir = workdir / "make_cam" / "train_cam"
    sizes = json.loads((cam_dir / "manifest.json").read_text())["sizes"]
    cams = sorted(cam_dir.glob("*.npy"))
    assert sizes == {path.name: path.stat().st_size for path in cams}
    damaged = cams[-1]  # the evaluation image is listed last
    whole = damaged.read_bytes()
    others = {path: path.stat().st_mtime_ns for path in cams if path != damaged}

    damaged.write_bytes(whole[:100])
    with pytest.raises(
        DamagedFileError,
        match=re.escape(
            f"{damaged} is damaged: 100 bytes, but {cam_dir / 'manifest.json'} recorded {len(whole)}"
        )
        + ".*rerun stage make_cam to recompute it alone",
    ):
        _run(voc, workdir, "eval_cam")

    capsys.readouterr()
    assert _run(voc, workdir, "make_cam") == 0
    printed = capsys.readouterr().out
    assert (
        f"[make_cam] recomputing {damaged} is 100 bytes, its manifest recorded {len(whole)} bytes" in printed
    )
    assert f"{len(cams) - 1} of {len(cams)} images done already" in printed
    # Recomputed (alone, not in its original batch of equal-size images: float rounding may differ).
    assert damaged.stat().st_size == len(whole)
    recomputed, original = load_cam_file(damaged), np.load(io.BytesIO(whole), allow_pickle=True).item()
    for key in ("keys", "cam", "high_res"):
        np.testing.assert_allclose(recomputed[key], original[key], rtol=0, atol=1e-5)
    assert {path: path.stat().st_mtime_ns for path in others} == others  # the others were kept
    assert _run(voc, workdir, "eval_cam") == 0

    # Same size, other bytes: only the hash sees it; deleting the file and rerunning make_cam redoes it alone.
    _flip_a_byte(damaged)
    with pytest.raises(DamagedFileError, match=_damaged(damaged, cam_dir / "manifest.json", "make_cam")):
        _run(voc, workdir, "eval_cam")
    damaged.unlink()
    capsys.readouterr()
    assert _run(voc, workdir, "make_cam,eval_cam") == 0
    assert f"{len(cams) - 1} of {len(cams)} images done already" in capsys.readouterr().out


def test_the_check_cost_benchmark_runs_on_a_finished_workdir(
    finished: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_output_checks.py"
    spec = importlib.util.spec_from_file_location("bench_output_checks", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    voc, workdir = finished
    rows = bench.main(["--voc-root", str(voc), "--workdir", str(workdir), "--repeats", "1"])
    assert [row["kind"] for row in rows] == ["CAM .npy", "label .png"]
    assert all(row["files"] > 0 and row["hash_ms"] > 0 and row["read_ms"] > 0 for row in rows)
    assert "hash/read" in capsys.readouterr().out
