"""Per-image outputs carry their sizes in the manifest (stat only): a truncated CAM file is recomputed (by
name) when make_cam reruns, and named with the stage to rerun when eval_cam reads it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import make_mini_voc, run_tiny

from clims_pipeline.cams import load_cam_file
from clims_pipeline.files import DamagedFileError


def _run(voc: Path, workdir: Path, stages: str) -> int:
    return run_tiny(voc, workdir, stages, "--cam-source=train_cam")


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
        match=re.escape(f"{damaged} is damaged: 100 bytes, its manifest recorded {len(whole)} bytes")
        + ".*rerun stage make_cam",
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
