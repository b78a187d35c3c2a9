"""Shared helpers of the pipeline tests (mini VOC data sets, the CLI runner, the VOC sample)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
ENTRY_POINT = EXAMPLES_DIR / "voc_full_pipeline.py"

#: 100 real VOC 2012 images + masks (70 train, 30 val); see its README.md.
VOC_SAMPLE = Path(os.environ.get("CLIMS_VOC_SAMPLE", REPO_ROOT.parent / "shared" / "data" / "voc2012_sample"))

#: Overrides that make every stage of the smoke preset take seconds: 1 epoch, 2 scales.
FAST_SMOKE_ARGS = (
    "--preset",
    "smoke",
    "--epochs-cam",
    "1",
    "--epochs-clims",
    "1",
    "--set",
    "make_cam.scales=[1.0,0.5]",
)


def require_voc_sample() -> Path:
    if not (VOC_SAMPLE / "JPEGImages").is_dir():
        message = f"VOC sample not found at {VOC_SAMPLE} (set CLIMS_VOC_SAMPLE)"
        # CI always has shared/ beside the clone: a missing sample there is a broken set-up, not a skip.
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VOC_SAMPLE


def make_mini_voc(root: Path, train: int = 16, val: int = 4, *, nested: bool = False) -> Path:
    """Copy the first ``train``/``val`` ids of the VOC sample into a fresh VOC layout under ``root``.

    With ``nested`` the layout is ``root/VOCdevkit/VOC2012/...``; the returned path is what --voc-root takes.
    """
    sample = require_voc_sample()
    voc = root / "VOCdevkit" / "VOC2012" if nested else root
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    splits = {}
    for split, count in (("train", train), ("val", val)):
        ids = (sample / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:count]
        splits[split] = ids
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for folder, suffix in (
        ("JPEGImages", ".jpg"),
        ("SegmentationClass", ".png"),
        ("SegmentationClassAug", ".png"),
    ):
        (voc / folder).mkdir(parents=True)
        for image_id in splits["train"] + splits["val"]:
            shutil.copyfile(sample / folder / f"{image_id}{suffix}", voc / folder / f"{image_id}{suffix}")
    return root if nested else voc


#: Settings that make train_cam, train_clims, make_cam and eval_cam take a second on a mini data set.
TINY_RUN_ARGS = (
    "--preset=smoke",
    "--set=train_cam.max_steps=2",
    "--set=train_clims.train.max_steps=2",
    "--set=train_cam.batch_size=4",
    "--set=train_clims.train.batch_size=4",
    "--set=data.crop_size=32",
    "--set=make_cam.scales=[1.0]",
    "--set=eval_cam.overlays=0",
    "--seed=3",
)


def run_tiny(voc: Path, workdir: Path, stages: str, *extra: str) -> int:
    """``stages`` on ``voc`` with :data:`TINY_RUN_ARGS`, in this process."""
    return run_cli(["--voc-root", voc, "--workdir", workdir, "--stages", stages, *TINY_RUN_ARGS, *extra])


def run_cli(args: Sequence[str]) -> int:
    """Run the pipeline in this process (a single-process run)."""
    from clims_pipeline.cli import main

    return main([str(a) for a in args])


def run_subprocess(
    args: Sequence[str], *, nproc: int = 1, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the entry point in a fresh interpreter (``torchrun`` when ``nproc`` > 1)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
        ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [*launcher, str(ENTRY_POINT), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def load_state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
