"""Loading errors always name the file and say what to do: a truncated CLIP resume point, backbone weights,
segmentation init weights; and train_clip/model.pt carries its size and sha256 in its manifest, checked when
mine_backgrounds / train_clims load it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from pipeline_helpers import run_cli

from clims_pipeline import clip_training
from clims_pipeline.files import DamagedFileError, sha256_file
from clims_pipeline.networks import build_network, load_backbone_state
from clims_pipeline.segmentation_init import read_state_dict
from clims_pipeline.toy import clip as toy_clip
from clims_pipeline.toy import world as toyworld


def _truncated_torch_file(path: Path) -> Path:
    torch.save({"state_dict": {"weight": torch.zeros(64, 64)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def test_truncated_clip_resume_point_is_named(tmp_path: Path) -> None:
    world = tmp_path / "world"
    tiny = {"n_train": 8, "n_val": 2, "n_background_only": 2, "n_background_only_val": 2, "image_size": 32}
    toyworld.generate_toy_world(world, seed=3, progress=False, **tiny)
    out_path = tmp_path / "c.pt"
    resume = _truncated_torch_file(Path(str(out_path) + ".resume"))
    with pytest.raises(
        DamagedFileError,
        match=re.escape(f"{resume} (300 bytes) is damaged and cannot be loaded") + ".*delete it to train",
    ):
        clip_training.train_clip(
            toy_clip.toy_world_samples(world),
            model_name=toy_clip.TOY_CLIP_CONFIG,
            epochs=1,
            batch_size=4,
            seed=0,
            out_path=out_path,
            progress=False,
        )


def test_truncated_backbone_weights_are_named(tmp_path: Path) -> None:
    path = _truncated_torch_file(tmp_path / "resnet.pth")
    model = build_network("cam", "tiny", "none", 20)
    with pytest.raises(
        DamagedFileError, match=re.escape(f"{path} (300 bytes) is damaged") + ".*--backbone-weights"
    ):
        load_backbone_state(model, path)


def test_truncated_segmentation_init_weights_are_named(tmp_path: Path) -> None:
    path = _truncated_torch_file(tmp_path / "deeplab.pth")
    with pytest.raises(ValueError, match=re.escape(f"train_seg.weights {path}: ") + ".*truncated or corrupt"):
        read_state_dict(path)


TRAIN_CLIP = shlex.split(
    "--set toy_world.n_train=16 --set toy_world.n_val=4 --set train_clip.epochs=1 "
    "--set train_clip.batch_size=16 --set train_clip.corpus=captions --set mine_backgrounds.max_images=4 "
    "--set train_cam.max_steps=1 --set train_clims.train.max_steps=1 --set train_cam.batch_size=4 "
    "--set train_clims.train.batch_size=4"
)


@pytest.mark.parametrize("stages", ["mine_backgrounds", "train_cam,train_clims"])
def test_train_clip_model_proof_is_checked_when_a_stage_loads_it(tmp_path: Path, stages: str) -> None:
    assert run_cli(["--workdir", tmp_path, "--stages", "train_clip", *TRAIN_CLIP]) == 0
    model = tmp_path / "train_clip" / "model.pt"
    proof = json.loads((tmp_path / "train_clip" / "manifest.json").read_text())["files"]["model.pt"]
    assert proof == {"size": model.stat().st_size, "sha256": sha256_file(model)}
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(
        DamagedFileError,
        match=re.escape(f"{model} is damaged: 1000 bytes, but ") + ".*rerun stage train_clip with --force",
    ):
        run_cli(["--workdir", tmp_path, "--stages", stages, *TRAIN_CLIP])
