"""Outputs carry their own proof: model.pt's size and sha256 are in its manifest; a truncated model is
recomputed, a changed one refused by name, a damaged checkpoint named; nothing is deleted before a stage's
inputs have loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pipeline_helpers import make_mini_voc, run_tiny

from clims_pipeline.files import DamagedFileError, sha256_file


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mini_voc(tmp_path_factory.mktemp("voc"), train=8, val=1)


def _run(voc: Path, workdir: Path, stages: str, *extra: str) -> int:
    return run_tiny(voc, workdir, stages, *extra)


def test_manifest_records_the_model_and_a_truncated_model_is_retrained(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "w"
    assert _run(voc, workdir, "train_cam") == 0
    model = workdir / "train_cam" / "model.pt"
    manifest = json.loads((workdir / "train_cam" / "manifest.json").read_text())
    proof = manifest["files"]["model.pt"]
    assert proof == {"size": model.stat().st_size, "sha256": sha256_file(model)}
    model.write_bytes(model.read_bytes()[: proof["size"] // 2])
    capsys.readouterr()
    assert _run(voc, workdir, "train_cam") == 0
    printed = capsys.readouterr().out
    assert f"{model} is {proof['size'] // 2} bytes, its manifest recorded {proof['size']} bytes" in printed
    assert "done already" not in printed
    assert sha256_file(model) == proof["sha256"]  # retrained to the same bytes


def test_a_changed_model_is_refused_by_name_and_make_cam_keeps_its_files(voc: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    assert _run(voc, workdir, "train_cam,make_cam") == 0
    cams = sorted((workdir / "make_cam").rglob("*.npy"))
    assert cams
    before = {path: path.read_bytes() for path in cams}
    model = workdir / "train_cam" / "model.pt"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte: loads silently without the hash
    model.write_bytes(bytes(data))
    with pytest.raises(
        DamagedFileError, match=re.escape(f"{model} is damaged: its sha256 is ") + ".*--force"
    ):
        _run(voc, workdir, "make_cam", "--force")
    assert {path: path.read_bytes() for path in cams} == before  # nothing deleted before the model loaded


def test_a_truncated_model_without_a_manifest_entry_is_named(voc: Path, tmp_path: Path) -> None:
    # A model from before manifests recorded proofs: loading errors still name the file.
    workdir = tmp_path / "w"
    assert _run(voc, workdir, "train_cam") == 0
    manifest_path = workdir / "train_cam" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]
    manifest_path.write_text(json.dumps(manifest))
    model = workdir / "train_cam" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(
        DamagedFileError, match=re.escape(f"{model} (1000 bytes) is damaged and cannot be loaded")
    ):
        _run(voc, workdir, "make_cam")


def test_a_truncated_checkpoint_is_named(voc: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    assert _run(voc, workdir, "train_cam") == 0
    directory = workdir / "train_cam"
    # What a run killed mid-training leaves, with a checkpoint a full disk cut short.
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    checkpoint = directory / "checkpoint.pt"
    checkpoint.write_bytes((directory / "model.pt").read_bytes()[:777])
    (directory / "model.pt").unlink()
    with pytest.raises(
        DamagedFileError,
        match=re.escape(f"{checkpoint} (777 bytes) is damaged and cannot be loaded") + ".*delete it",
    ):
        _run(voc, workdir, "train_cam")
