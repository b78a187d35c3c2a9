"""IRNet's stages under torchrun and after a kill (slow: several interpreters).

* A 2-process ``torchrun`` run of train_irn -> make_sem_seg equals the 1-process run: the same relation
  labels, the same parameters after the same global batches (the pair means are global), the same pseudo
  masks and mIoU (make_sem_seg in one process from the 2-process IRNet, so that a 1e-6 difference in the
  boundary map cannot flip a pixel).
* ``kill -9`` during train_irn (after the first epoch's checkpoint) and a rerun end with exactly the
  parameters of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import load_state, make_mini_voc, run_cli, run_subprocess

from clims_pipeline.distributed import KILL_AT_STEP_ENV

pytestmark = pytest.mark.slow

COMMON = [
    *("--preset", "smoke", "--seed", "3", "--set", "train_irn.crf=false"),
    *("--set", "make_cam.scales=[1.0]", "--set", "train_cam.max_steps=1", "--set", "train_cam.batch_size=8"),
    *("--set", "train_irn.train.batch_size=4", "--set", "train_irn.train.epochs=2"),
]
IRN_STAGES = ["--stages", "train_irn,make_sem_seg"]


def copy_workdir(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target)
    for stage in drop:
        shutil.rmtree(target / stage, ignore_errors=True)
    (target / "results.json").unlink(missing_ok=True)
    return target


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 training images with their CAMs (2 steps of 4 per epoch)."""
    voc = make_mini_voc(tmp_path_factory.mktemp("voc"), train=8, val=2)
    workdir = tmp_path_factory.mktemp("irn") / "prefix"
    assert run_cli(["--voc-root", voc, "--workdir", workdir, *COMMON, "--stages", "train_cam,make_cam"]) == 0
    return voc, workdir


def cli(voc: Path, workdir: Path, *args: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun process (OMP_NUM_THREADS=1)
    try:
        assert run_cli(["--voc-root", voc, "--workdir", workdir, *COMMON, *args]) == 0
    finally:
        torch.set_num_threads(threads)


def assert_same_pngs(single_dir: Path, ddp_dir: Path) -> None:
    names = sorted(p.name for p in single_dir.glob("*.png"))
    assert names and names == sorted(p.name for p in ddp_dir.glob("*.png"))
    for name in names:
        with Image.open(single_dir / name) as a, Image.open(ddp_dir / name) as b:
            assert np.array_equal(np.array(a), np.array(b)), f"{name} differs"


def test_two_process_irn_stages_equal_the_one_process_run(prefix: tuple[Path, Path]) -> None:
    from clims_pipeline.config import build_config
    from clims_pipeline.irnet import build_irnet

    voc, base = prefix
    ddp = copy_workdir(base, base.parent / "ddp")
    launched = run_subprocess(["--voc-root", voc, "--workdir", ddp, *COMMON, *IRN_STAGES], nproc=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "processes 2" in launched.stdout

    single = copy_workdir(base, base.parent / "single")
    cli(voc, single, "--stages", "train_irn")
    assert_same_pngs(single / "train_irn" / "labels", ddp / "train_irn" / "labels")
    config = build_config("smoke").train_irn
    torch.manual_seed(3)  # the stage's initialisation
    initial = build_irnet(config.backbone, "none", config.freeze_backbone).state_dict()
    single_state, ddp_state = (
        load_state(single / "train_irn" / "model.pt"),
        load_state(ddp / "train_irn" / "model.pt"),
    )
    moved = max((single_state[k].float() - initial[k].float()).abs().max().item() for k in initial)
    assert moved > 1e-4, "training did not change the parameters: the comparison would be vacuous"
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=0, msg=f"parameter {key} differs")

    masks = copy_workdir(ddp, base.parent / "single_masks", drop=("make_sem_seg",))
    cli(voc, masks, "--stages", "make_sem_seg")
    assert_same_pngs(masks / "make_sem_seg" / "masks", ddp / "make_sem_seg" / "masks")
    single_result = json.loads((masks / "results.json").read_text())["irn"]
    assert single_result == json.loads((ddp / "results.json").read_text())["irn"]


def test_killed_train_irn_resumes_to_the_uninterrupted_result(prefix: tuple[Path, Path]) -> None:
    voc, base = prefix
    train = ["--stages", "train_irn"]
    reference, killed = (
        copy_workdir(base, base.parent / "reference"),
        copy_workdir(base, base.parent / "killed"),
    )
    done = run_subprocess(["--voc-root", voc, "--workdir", reference, *COMMON, *train])
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 steps per epoch: step 3 is in the second epoch, after the first epoch's checkpoint.
    cut = run_subprocess(
        ["--voc-root", voc, "--workdir", killed, *COMMON, *train], env={KILL_AT_STEP_ENV: "3"}
    )
    assert cut.returncode == -signal.SIGKILL
    assert (killed / "train_irn" / "checkpoint.pt").is_file() and not (
        killed / "train_irn" / "model.pt"
    ).exists()
    resumed = run_subprocess(["--voc-root", voc, "--workdir", killed, *COMMON, *train])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(epoch 1, step 2)" in resumed.stdout
    expected, actual = (
        load_state(reference / "train_irn" / "model.pt"),
        load_state(killed / "train_irn" / "model.pt"),
    )
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"parameter {key} differs"
