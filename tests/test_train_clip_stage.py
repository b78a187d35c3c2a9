"""Stage train_clip on a small generated toy world: killed mid-epoch and rerun, it ends with the weights of
an uninterrupted run; under torchrun with 2 processes (rank 0 trains, the other waits) it writes the same
CLIP."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

import pytest
import torch
from pipeline_helpers import load_state, run_subprocess

# 48 + 4 background-only captions, batch 16: 3 steps per epoch, 2 epochs. The kill lands after step 4.
TRAIN_CLIP = shlex.split(
    "--stages train_clip --set toy_world.n_train=48 --set toy_world.n_val=8 --set train_clip.epochs=2 "
    "--set train_clip.batch_size=16 --set train_clip.corpus=captions"
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    workdir = tmp_path_factory.mktemp("clip_reference")
    run = run_subprocess(["--workdir", workdir, *TRAIN_CLIP])
    assert run.returncode == 0, run.stderr[-3000:]
    return load_state(workdir / "train_clip" / "model.pt")


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=0, rtol=0, msg=f"parameter {key} differs")


def test_killed_train_clip_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    workdir = tmp_path / "killed"
    killed = run_subprocess(
        ["--workdir", workdir, *TRAIN_CLIP], env={"CLIMS_PIPELINE_TEST_KILL_AT_STEP": "4"}
    )
    assert killed.returncode == -signal.SIGKILL
    assert (workdir / "train_clip" / "model.pt.resume").is_file()  # the first epoch's state
    resumed = run_subprocess(["--workdir", workdir, *TRAIN_CLIP])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(epoch 1, step 3)" in resumed.stdout
    assert_same_weights(load_state(workdir / "train_clip" / "model.pt"), reference)


def test_train_clip_under_two_processes_writes_the_same_clip(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    run = run_subprocess(["--workdir", tmp_path, *TRAIN_CLIP], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "processes 2" in run.stdout
    assert_same_weights(load_state(tmp_path / "train_clip" / "model.pt"), reference)
