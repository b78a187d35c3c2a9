"""Kill a training stage mid-epoch (SIGKILL), rerun it: it resumes from the last epoch checkpoint and ends
with exactly the parameters of an uninterrupted run with the same seed."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

import pytest
import torch
from pipeline_helpers import load_state, make_mini_voc, run_cli, run_subprocess

# 16 images, batch 8: 2 steps per epoch, 3 epochs. The kill lands after step 3, in the middle of epoch 2.
TRAIN = shlex.split(
    "--stages train_cam --preset smoke --epochs-cam 3 --set train_cam.batch_size=8 "
    "--set data.crop_size=48 --seed 5"
)
KILL_ENV = {"CLIMS_PIPELINE_TEST_KILL_AT_STEP": "3"}


@pytest.fixture(scope="module")
def mini_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mini_voc(tmp_path_factory.mktemp("mini_voc"), train=16, val=2)


def uninterrupted_state(mini_voc: Path, workdir: Path, train: list[str]) -> dict[str, torch.Tensor]:
    reference = run_subprocess(["--voc-root", mini_voc, "--workdir", workdir, *train])
    assert reference.returncode == 0, reference.stderr[-3000:]
    return load_state(workdir / "train_cam" / "model.pt")


@pytest.fixture(scope="module")
def reference_state(mini_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The parameters of an uninterrupted run."""
    return uninterrupted_state(mini_voc, tmp_path_factory.mktemp("reference"), TRAIN)


def _kill_mid_run(mini_voc: Path, workdir: Path) -> None:
    killed = run_subprocess(["--voc-root", mini_voc, "--workdir", workdir, *TRAIN], env=KILL_ENV)
    assert killed.returncode == -signal.SIGKILL
    assert (workdir / "train_cam" / "checkpoint.pt").is_file()
    assert not (workdir / "train_cam" / "model.pt").exists()
    assert not list((workdir / "train_cam").glob(".*partial"))  # no half-written file left behind


def _assert_same_parameters(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-6, rtol=0, msg=f"parameter {key} differs")


def test_killed_training_resumes_to_the_uninterrupted_result(
    mini_voc: Path, tmp_path: Path, reference_state: dict[str, torch.Tensor]
) -> None:
    workdir = tmp_path / "killed"
    _kill_mid_run(mini_voc, workdir)
    resumed = run_subprocess(["--voc-root", mini_voc, "--workdir", workdir, *TRAIN])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(epoch 1, step 2)" in resumed.stdout
    _assert_same_parameters(load_state(workdir / "train_cam" / "model.pt"), reference_state)


def test_single_process_run_resumes_under_torchrun(
    mini_voc: Path, tmp_path: Path, reference_state: dict[str, torch.Tensor]
) -> None:
    # The global batches do not depend on the number of processes, so neither does the result.
    workdir = tmp_path / "killed"
    _kill_mid_run(mini_voc, workdir)
    resumed = run_subprocess(["--voc-root", mini_voc, "--workdir", workdir, *TRAIN], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "processes 2" in resumed.stdout
    _assert_same_parameters(load_state(workdir / "train_cam" / "model.pt"), reference_state)


def test_checkpoint_from_other_settings_is_refused(mini_voc: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    _kill_mid_run(mini_voc, workdir)
    with pytest.raises(RuntimeError, match="--force"):
        run_cli(["--voc-root", mini_voc, "--workdir", workdir, *TRAIN, "--set", "train_cam.lr=0.5"])


@pytest.mark.slow
def test_killed_clims_training_resumes_to_the_uninterrupted_result(mini_voc: Path, tmp_path: Path) -> None:
    clims = [
        "--preset",
        "smoke",
        "--epochs-cam",
        "1",
        "--epochs-clims",
        "2",
        "--set",
        "train_cam.batch_size=8",
        "--set",
        "train_clims.train.batch_size=8",
        "--set",
        "data.crop_size=48",
        "--seed",
        "5",
    ]
    for name in ("reference", "killed"):
        base = run_subprocess(
            ["--voc-root", mini_voc, "--workdir", tmp_path / name, "--stages", "train_cam", *clims]
        )
        assert base.returncode == 0, base.stderr[-3000:]
    stages = ["--stages", "train_clims"]
    reference = run_subprocess(["--voc-root", mini_voc, "--workdir", tmp_path / "reference", *stages, *clims])
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run_subprocess(
        ["--voc-root", mini_voc, "--workdir", tmp_path / "killed", *stages, *clims], env=KILL_ENV
    )
    assert killed.returncode == -signal.SIGKILL
    resumed = run_subprocess(["--voc-root", mini_voc, "--workdir", tmp_path / "killed", *stages, *clims])
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    expected = load_state(tmp_path / "reference" / "train_clims" / "model.pt")
    actual = load_state(tmp_path / "killed" / "train_clims" / "model.pt")
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-6, rtol=0, msg=f"parameter {key} differs")


# 16 images, batch 4: 4 steps per epoch, 3 epochs; checkpoints every 3 steps land mid-epoch.
MID_EPOCH = shlex.split(
    "--stages train_cam --preset smoke --epochs-cam 3 --set train_cam.batch_size=4 "
    "--set data.crop_size=48 --seed 5"
)


@pytest.fixture(scope="module")
def mid_epoch_reference(mini_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """An uninterrupted run without step checkpoints (they must not change the result)."""
    return uninterrupted_state(mini_voc, tmp_path_factory.mktemp("mid_reference"), MID_EPOCH)


def test_killed_after_a_mid_epoch_checkpoint_resumes_bit_identically(
    mini_voc: Path, tmp_path: Path, mid_epoch_reference: dict[str, torch.Tensor]
) -> None:
    workdir = tmp_path / "killed"
    args = ["--voc-root", mini_voc, "--workdir", workdir, *MID_EPOCH, "--set", "train_cam.checkpoint_every=3"]
    killed = run_subprocess(args, env={"CLIMS_PIPELINE_TEST_KILL_AT_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL
    checkpoint = torch.load(workdir / "train_cam" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["epoch_batches"]) == (1, 6, 2)
    resumed = run_subprocess(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(epoch 1, step 6, 2 batches into it)" in resumed.stdout
    _assert_same_parameters(load_state(workdir / "train_cam" / "model.pt"), mid_epoch_reference)


def test_sigterm_writes_a_checkpoint_and_the_rerun_resumes_bit_identically(
    mini_voc: Path, tmp_path: Path, mid_epoch_reference: dict[str, torch.Tensor]
) -> None:
    workdir = tmp_path / "preempted"
    args = ["--voc-root", mini_voc, "--workdir", workdir, *MID_EPOCH]
    preempted = run_subprocess(
        args, env={"CLIMS_PIPELINE_TEST_KILL_AT_STEP": "5", "CLIMS_PIPELINE_TEST_KILL_SIGNAL": "TERM"}
    )
    assert preempted.returncode == 128 + signal.SIGTERM, preempted.stderr[-3000:]
    assert "SIGTERM: saved" in preempted.stdout and "at step 5" in preempted.stdout
    resumed = run_subprocess(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(epoch 1, step 5, 1 batches into it)" in resumed.stdout
    _assert_same_parameters(load_state(workdir / "train_cam" / "model.pt"), mid_epoch_reference)
