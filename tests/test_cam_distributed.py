"""DDP over 2 CPU processes (gloo): one optimisation step equals a single-process step on the same batch."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from pipeline_helpers import load_state, make_mini_voc, run_subprocess

# One train_cam step then one train_clims step, each on a global batch of 8 crops; 16 training images so the
# sampler has a real permutation to shard. The official variant's tiny random CLIP gives OTM/BTM real
# gradients (the paper preset clamps them away), and the ranks hold different numbers of positive pairs, so
# train_clims' per-rank rescaling is exercised.
ONE_STEP_EACH = shlex.split(
    "--stages train_cam,train_clims --preset smoke --variant official --seed 3 --set data.crop_size=48 "
    "--set train_cam.max_steps=1 --set train_cam.batch_size=8 "
    "--set train_clims.train.max_steps=1 --set train_clims.train.batch_size=8 --set train_clims.train.lr=0.05"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    mini_voc = make_mini_voc(tmp_path_factory.mktemp("mini_voc"), train=16, val=2)
    single_dir, ddp_dir = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    single = run_subprocess(["--voc-root", mini_voc, "--workdir", single_dir, *ONE_STEP_EACH])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_subprocess(["--voc-root", mini_voc, "--workdir", ddp_dir, *ONE_STEP_EACH], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "processes 2" in ddp.stdout
    return single_dir, ddp_dir


def _assert_step_matches(single: Path, ddp: Path, before: dict[str, torch.Tensor]) -> None:
    single_state, ddp_state = load_state(single), load_state(ddp)
    moved = max((single_state[k].float() - before[k].float()).abs().max().item() for k in before)
    assert moved > 1e-4, "the step did not change the parameters: the comparison would be vacuous"
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=0, msg=f"parameter {key} differs")


def test_two_process_cam_step_equals_single_process_step(runs: tuple[Path, Path]) -> None:
    from clims_pipeline.networks import build_network

    torch.manual_seed(3)  # the stage's initialisation
    initial = build_network("cam", "tiny", "none", 20).state_dict()
    single, ddp = runs
    _assert_step_matches(single / "train_cam" / "model.pt", ddp / "train_cam" / "model.pt", initial)


def test_two_process_clims_step_equals_single_process_step(runs: tuple[Path, Path]) -> None:
    single, ddp = runs
    start = load_state(single / "train_cam" / "model.pt")
    _assert_step_matches(single / "train_clims" / "model.pt", ddp / "train_clims" / "model.pt", start)
