"""DDP over 2 CPU processes (gloo) for refinement and segmentation: train_aff and train_seg steps equal
single-process steps on the same global batches; make_rw and eval_seg, sharded over the ranks, write the
same files.

One ``torchrun`` launch runs train_aff -> make_rw -> train_seg -> eval_seg on 8 real VOC images. The
single-process references run in this process, each from the same inputs as the 2-process stage it checks:
train_aff from the same CAMs; make_rw and train_seg from the 2-process run's AffinityNet (a 1e-6 difference
in the affinities could flip an arg-max and make a pixel-exact comparison flaky); eval_seg from the 2-process
run's DeepLabV2. Crops are rescaled to 0.1-0.15 so that train_seg's crops are padded (ignored pixels) by
different amounts on the two ranks: that is what makes per-rank loss means differ from the global one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import load_state, make_mini_voc, run_cli, run_subprocess

COMMON = [
    *("--preset", "smoke", "--seed", "3"),
    *("--set", "train_aff.crf=false", "--set", "make_rw.crf=false", "--set", "eval_seg.crf=false"),
    *("--set", "make_cam.scales=[1.0]", "--set", "eval_seg.scales=[1.0]"),
    *("--set", "train_cam.max_steps=1", "--set", "train_cam.batch_size=8"),
    # Two steps of global batch 4 each (2 crops per rank), from 8 training images.
    *("--set", "train_aff.train.batch_size=4", "--set", "train_aff.train.max_steps=2"),
    *("--set", "train_seg.train.batch_size=4", "--set", "train_seg.train.max_steps=2"),
    *("--set", "train_seg.scales=[0.1,0.15]"),
]
PART2 = ["--stages", "train_aff,make_rw,train_seg,eval_seg"]


def copy_workdir(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target)
    for stage in drop:
        shutil.rmtree(target / stage, ignore_errors=True)
    (target / "results.json").unlink(missing_ok=True)
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    voc = make_mini_voc(tmp_path_factory.mktemp("voc"), train=8, val=2)
    root = tmp_path_factory.mktemp("part2_ddp")

    def cli(workdir: Path, *args: str) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like each torchrun process (OMP_NUM_THREADS=1)
        try:
            assert run_cli(["--voc-root", voc, "--workdir", workdir, *COMMON, *args]) == 0
        finally:
            torch.set_num_threads(threads)

    prefix = root / "prefix"
    cli(prefix, "--stages", "train_cam,make_cam")
    ddp = copy_workdir(prefix, root / "ddp")
    result = run_subprocess(["--voc-root", voc, "--workdir", ddp, *COMMON, *PART2], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stdout

    aff = copy_workdir(prefix, root / "single_aff")
    cli(aff, "--stages", "train_aff")
    # From the 2-process AffinityNet: make_rw and train_seg in one process.
    seg = copy_workdir(ddp, root / "single_seg", drop=("make_rw", "train_seg", "eval_seg"))
    cli(seg, "--stages", "make_rw,train_seg")
    # From the 2-process DeepLabV2: eval_seg in one process.
    evaluation = copy_workdir(ddp, root / "single_eval", drop=("eval_seg",))
    cli(evaluation, "--stages", "eval_seg")
    return {"ddp": ddp, "aff": aff, "seg": seg, "eval": evaluation}


def assert_step_matches(single: Path, ddp: Path, before: dict[str, torch.Tensor]) -> None:
    single_state, ddp_state = load_state(single), load_state(ddp)
    moved = max((single_state[k].float() - before[k].float()).abs().max().item() for k in before)
    assert moved > 1e-4, "the steps did not change the parameters: the comparison would be vacuous"
    assert single_state.keys() == ddp_state.keys()
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=0, msg=f"parameter {key} differs")


def assert_same_pngs(single_dir: Path, ddp_dir: Path) -> None:
    names = sorted(p.name for p in single_dir.glob("*.png"))
    assert names and names == sorted(p.name for p in ddp_dir.glob("*.png"))
    for name in names:
        with Image.open(single_dir / name) as a, Image.open(ddp_dir / name) as b:
            assert np.array_equal(np.array(a), np.array(b)), f"{name} differs"


def results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_train_aff_two_process_steps_equal_single_process_steps(runs: dict[str, Path]) -> None:
    from clims_pipeline.config import build_config
    from clims_pipeline.random_walk import build_affinity_net

    assert_same_pngs(runs["aff"] / "train_aff" / "labels", runs["ddp"] / "train_aff" / "labels")
    torch.manual_seed(3)  # the stage's initialisation
    initial = build_affinity_net(build_config("smoke").train_aff.backbone, "none").state_dict()
    assert_step_matches(
        runs["aff"] / "train_aff" / "model.pt", runs["ddp"] / "train_aff" / "model.pt", initial
    )


def recorded_hashes(directory: Path) -> dict[str, str]:
    """The sha256 of every file the manifest of ``directory`` recorded, after checking them against the
    files."""
    from clims_pipeline.files import sha256_file

    hashes: dict[str, str] = json.loads((directory / "manifest.json").read_text())["sha256"]
    assert hashes and hashes == {key: sha256_file(directory / key) for key in hashes}
    return hashes


def test_make_rw_sharded_over_two_processes_writes_the_same_masks(runs: dict[str, Path]) -> None:
    assert_same_pngs(runs["seg"] / "make_rw" / "masks", runs["ddp"] / "make_rw" / "masks")
    assert results(runs["seg"])["rw"] == results(runs["ddp"])["rw"]
    # Each process hashed its share of the files; the main one recorded them all.
    assert recorded_hashes(runs["seg"] / "make_rw" / "masks") == recorded_hashes(
        runs["ddp"] / "make_rw" / "masks"
    )


def test_train_seg_two_process_steps_equal_single_process_steps(runs: dict[str, Path]) -> None:
    from clims_pipeline.deeplab import build_deeplab

    torch.manual_seed(3)
    initial = build_deeplab(21, "tiny", "none").state_dict()
    assert_step_matches(
        runs["seg"] / "train_seg" / "model.pt", runs["ddp"] / "train_seg" / "model.pt", initial
    )


def test_eval_seg_sharded_over_two_processes_gives_the_same_predictions(runs: dict[str, Path]) -> None:
    single, ddp = results(runs["eval"])["seg"], results(runs["ddp"])["seg"]
    assert single["images"] == ddp["images"] == 2
    single_dir, ddp_dir = Path(single.pop("predictions")), Path(ddp.pop("predictions"))
    assert single == ddp
    assert_same_pngs(single_dir, ddp_dir)
    single_hashes = recorded_hashes(runs["eval"] / "eval_seg" / "predictions")
    assert single_hashes == recorded_hashes(runs["ddp"] / "eval_seg" / "predictions")
