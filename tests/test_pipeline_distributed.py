"""DDP over 2 CPU processes (gloo): one optimisation step equals a single-process step on the same batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_helpers import load_state, make_mini_voc, run_subprocess

# One step of 8 crops (global batch); 16 training images so the sampler has a real permutation to shard.
ONE_STEP = [
    "--stages",
    "train_cam",
    "--preset",
    "smoke",
    "--epochs-cam",
    "1",
    "--set",
    "train_cam.max_steps=1",
    "--set",
    "train_cam.batch_size=8",
    "--set",
    "data.crop_size=48",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def mini_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mini_voc(tmp_path_factory.mktemp("mini_voc"), train=16, val=2)


def test_two_process_step_equals_single_process_step(mini_voc: Path, tmp_path: Path) -> None:
    single = run_subprocess(["--voc-root", mini_voc, "--workdir", tmp_path / "single", *ONE_STEP])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_subprocess(["--voc-root", mini_voc, "--workdir", tmp_path / "ddp", *ONE_STEP], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "processes 2" in ddp.stdout

    from clims_pipeline.networks import build_network

    torch.manual_seed(3)
    initial = build_network("cam", "tiny", "none", 20).state_dict()
    single_state = load_state(tmp_path / "single" / "train_cam" / "model.pt")
    ddp_state = load_state(tmp_path / "ddp" / "train_cam" / "model.pt")
    moved = max((single_state[k].float() - initial[k].float()).abs().max().item() for k in initial)
    assert moved > 1e-4, "the step did not change the parameters: the comparison would be vacuous"
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=0, msg=f"parameter {key} differs")


def test_two_process_clims_step_equals_single_process_step(mini_voc: Path, tmp_path: Path) -> None:
    # The official variant's tiny random CLIP gives OTM/BTM real gradients (the paper preset clamps them
    # away), and ranks hold different numbers of positive pairs, so the per-rank rescaling is exercised.
    args = [
        *ONE_STEP,
        "--stages",
        "train_cam,train_clims",
        "--variant",
        "official",
        "--set",
        "train_clims.train.max_steps=1",
        "--set",
        "train_clims.train.batch_size=8",
        "--set",
        "train_clims.train.lr=0.05",
    ]
    single = run_subprocess(["--voc-root", mini_voc, "--workdir", tmp_path / "single", *args])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_subprocess(["--voc-root", mini_voc, "--workdir", tmp_path / "ddp", *args], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    start = load_state(tmp_path / "single" / "train_cam" / "model.pt")
    single_state = load_state(tmp_path / "single" / "train_clims" / "model.pt")
    ddp_state = load_state(tmp_path / "ddp" / "train_clims" / "model.pt")
    moved = max((single_state[k].float() - start[k].float()).abs().max().item() for k in start)
    assert moved > 1e-4, "the step did not change the parameters: the comparison would be vacuous"
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=0, msg=f"parameter {key} differs")
