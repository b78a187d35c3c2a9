"""Stage mine_backgrounds and train_clims --backgrounds preset|mined|FILE on the VOC sample (smoke preset).

The smoke preset's CLIP is random, so what is mined here is noise; these tests check the plumbing. What
mining finds with a CLIP that learned something is checked on the toy world (the slow test at the end).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import FAST_SMOKE_ARGS, REPO_ROOT, require_voc_sample, run_cli

import clims_loss as cl

MINED = Path("mine_backgrounds") / "mined_backgrounds.json"
#: One optimisation step per trainer: these tests look at the prompts, not at the training.
ONE_STEP = ("--set", "train_cam.max_steps=1", "--set", "train_clims.train.max_steps=1")


def evaluator_records(workdir: Path) -> list[dict]:
    lines = (workdir / "logs" / "train_clims.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == "evaluator"]


def used_backgrounds(workdir: Path) -> dict[str, list[str]]:
    """The background terms per class of the evaluator the last train_clims run built (from its log)."""
    return evaluator_records(workdir)[-1]["background_terms"]


@pytest.fixture(scope="module")
def mined_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    voc_root = require_voc_sample()
    workdir = tmp_path_factory.mktemp("mining")
    args = ["--voc-root", voc_root, "--workdir", workdir, *FAST_SMOKE_ARGS, *ONE_STEP]
    assert (
        run_cli([*args, "--stages", "mine_backgrounds,train_cam,train_clims", "--backgrounds", "mined"]) == 0
    )
    return voc_root, workdir


def test_stage_writes_a_readable_registry_table_and_summary(mined_run: tuple[Path, Path]) -> None:
    _, workdir = mined_run
    registry = cl.BackgroundPromptRegistry.from_json(workdir / MINED)
    preset = cl.BackgroundPromptRegistry.preset("voc")
    assert registry.class_names == preset.class_names and registry.template == preset.template
    assert registry.global_backgrounds == ()
    assert registry.class_backgrounds, "a random CLIP still ranks some terms above the zero margin"
    for class_name, terms in registry.class_backgrounds.items():
        assert 1 <= len(terms) <= 3
        assert set(terms) <= set(cl.DEFAULT_BACKGROUND_VOCABULARY)
        assert list(registry.background_scores[class_name]) == sorted(
            registry.background_scores[class_name], reverse=True
        )
    summary = json.loads((workdir / "results.json").read_text())["mined_backgrounds"]
    assert summary["images"] == 70 and summary["split"] == "train" and summary["top_l"] == 3
    assert summary["class_backgrounds"] == {c: list(t) for c, t in registry.class_backgrounds.items()}
    table = (workdir / "mine_backgrounds" / "mined_backgrounds.md").read_text()
    assert "| class | rank | term | score | presence | objectness |" in table
    scores = json.loads((workdir / "mine_backgrounds" / "scores.json").read_text())
    assert len(scores["scores"]["boat"]) == len(cl.DEFAULT_BACKGROUND_VOCABULARY)


def test_train_clims_uses_the_mined_backgrounds(mined_run: tuple[Path, Path]) -> None:
    _, workdir = mined_run
    registry = cl.BackgroundPromptRegistry.from_json(workdir / MINED)
    used = used_backgrounds(workdir)
    assert used == {c: list(registry.backgrounds_for(c)) for c in registry.class_names}
    assert used != {
        c: list(cl.BackgroundPromptRegistry.preset("voc").backgrounds_for(c)) for c in registry.class_names
    }
    assert evaluator_records(workdir)[-1]["backgrounds"]["backgrounds"] == "mined"


def test_a_registry_file_replaces_the_backgrounds_only(
    mined_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc_root, workdir = mined_run
    edited = cl.BackgroundPromptRegistry.from_json(workdir / MINED).replace(
        name="edited",
        class_backgrounds={"boat": ("harbor", "dock")},
        background_scores={},
        weights=cl.LossWeights(1.0, 1.0, 1.0, 1.0),  # not a background field: the variant's weights stay
    )
    path = tmp_path / "edited.json"
    edited.to_json(path)
    args = ["--voc-root", voc_root, "--workdir", workdir, *FAST_SMOKE_ARGS, *ONE_STEP]
    # A model trained with the mined backgrounds exists: another choice retrains it, and says why.
    capsys.readouterr()
    assert run_cli([*args, "--stages", "train_clims", "--backgrounds", path]) == 0
    printed = capsys.readouterr().out
    assert "[train_clims] recomputing" in printed and "backgrounds.backgrounds" in printed
    used = used_backgrounds(workdir)
    assert used["boat"] == ["harbor", "dock"]
    assert all(terms == [] for name, terms in used.items() if name != "boat")
    record = evaluator_records(workdir)[-1]
    assert record["weights"] == cl.BackgroundPromptRegistry.preset("voc").weights.as_dict()
    assert record["backgrounds"]["file"] == str(path.resolve())


def test_missing_mined_file_is_a_clear_error_before_training(tmp_path: Path) -> None:
    voc_root = require_voc_sample()
    args = ["--voc-root", voc_root, "--workdir", tmp_path, *FAST_SMOKE_ARGS]
    with pytest.raises(FileNotFoundError, match=r"mined_backgrounds\.json; run the mine_backgrounds stage"):
        run_cli([*args, "--stages", "train_cam,train_clims", "--backgrounds", "mined"])
    assert not (tmp_path / "train_cam" / "model.pt").exists()  # the preflight stopped it before train_cam
    with pytest.raises(FileNotFoundError, match="neither 'preset', 'mined' nor an existing"):
        run_cli([*args, "--stages", "train_clims", "--backgrounds", tmp_path / "nope.json"])


def test_registry_file_with_other_classes_is_refused(tmp_path: Path) -> None:
    voc_root = require_voc_sample()
    coco = tmp_path / "coco.json"
    cl.BackgroundPromptRegistry.preset("coco").to_json(coco)
    common = ["--voc-root", voc_root, "--workdir", tmp_path, *FAST_SMOKE_ARGS]
    with pytest.raises(ValueError, match="has classes"):
        run_cli([*common, "--stages", "train_clims", "--backgrounds", coco])


def test_vocabulary_file_and_stale_settings(tmp_path: Path) -> None:
    voc_root = require_voc_sample()
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("# stuff terms\nwater\n\nsea  # a comment\nroad\nwater\ngrass\nsky\n")
    args = ["--voc-root", voc_root, "--workdir", tmp_path / "run", *FAST_SMOKE_ARGS, "--stages"]
    mine = [*args, "mine_backgrounds", "--mine-vocabulary", vocabulary, "--mine-top-l", "1"]
    assert run_cli([*mine, "--set", "mine_backgrounds.max_images=30"]) == 0
    registry = cl.BackgroundPromptRegistry.from_json(tmp_path / "run" / MINED)
    assert all(len(terms) == 1 for terms in registry.class_backgrounds.values())
    scores = json.loads((tmp_path / "run" / "mine_backgrounds" / "scores.json").read_text())
    assert scores["images"] == 30
    assert sorted(entry["term"] for entry in scores["scores"]["boat"]) == [
        "grass",
        "road",
        "sea",
        "sky",
        "water",
    ]
    # Other settings must not silently reuse the file (it may hold the user's edits: only --force redoes it).
    with pytest.raises(RuntimeError, match="mined with other settings"):
        run_cli([*mine, "--set", "mine_backgrounds.max_images=20"])
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no terms"):
        run_cli([*args, "mine_backgrounds", "--mine-vocabulary", tmp_path / "empty.txt"])


def test_stage_on_the_toy_dataset_starts_from_the_toy_registry(tmp_path: Path) -> None:
    """--dataset toy: the toy registry (not a library preset) and its CBS form carry over to the mined one."""
    from clims_pipeline.toy import world as toyworld
    from clims_pipeline.toy.experiment import toy_registry

    world = tmp_path / "world"
    toyworld.generate_toy_world(world, n_train=24, n_val=4, n_background_only=0, progress=False)
    args = [
        "--dataset",
        "toy",
        "--voc-root",
        world,
        "--workdir",
        tmp_path / "run",
        "--clip-pretrained",
        "none",
    ]
    assert run_cli([*args, "--stages", "mine_backgrounds", "--set", "data.train_split=train_aug"]) == 0
    registry = cl.BackgroundPromptRegistry.from_json(tmp_path / "run" / MINED)
    toy = toy_registry()
    assert registry.class_names == toy.class_names and registry.cbs_reduction == toy.cbs_reduction
    assert json.loads((tmp_path / "run" / "results.json").read_text())["mined_backgrounds"]["images"] == 24


def mine_toy_world(world: Path, clip_checkpoint: Path, split: str = "train") -> tuple:
    """Mine a toy world's train split with a tiny CLIP trained on its captions; vocabulary: the toy world's
    background words plus the default list."""
    import torch

    from clims_loss.clip_loading import clip_input_size, clip_normalization
    from clims_pipeline import clip_training
    from clims_pipeline.toy import clip as toy_clip
    from clims_pipeline.toy import world as toyworld

    clip_model, tokenizer = cl.load_open_clip(toy_clip.TOY_CLIP_CONFIG, pretrained=clip_checkpoint)
    clip_model.eval()  # its ResNet's BatchNorm must use the trained statistics, not the batch's
    size = clip_input_size(clip_model)
    mean, std = (
        torch.tensor(x).view(1, 3, 1, 1) for x in clip_normalization(clip_model, (cl.CLIP_MEAN, cl.CLIP_STD))
    )
    ids = (world / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    class_lists = json.loads((world / "cls_labels.json").read_text())
    labels = torch.zeros(len(ids), len(toyworld.TOY_CLASSES))
    for row, image_id in enumerate(ids):
        labels[row, [k - 1 for k in class_lists[image_id]]] = 1.0
    pixels = [clip_training.load_image(toyworld.image_path(world, image_id), size) for image_id in ids]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)
    toy_terms = [term for terms in toyworld.BACKGROUND_TERMS.values() for term in terms]
    vocabulary = list(dict.fromkeys([*toy_terms, *cl.DEFAULT_BACKGROUND_VOCABULARY]))
    prompts = cl.BackgroundPromptRegistry(**toyworld.toy_prompts())
    return cl.mine_backgrounds(clip_model, tokenizer, images, labels, prompts, vocabulary, top_l=3)


@pytest.mark.slow
def test_toy_world_each_object_finds_its_own_background(tmp_path: Path) -> None:
    """A tiny CLIP trained on the toy world's captions puts each object's own background in its mined top 3.

    Set CLIMS_TOY_WORLD and CLIMS_TOY_CLIP to reuse a world and its trained CLIP; otherwise a 4,000-image
    world is generated and the CLIP trained on it (minutes on a CPU).
    """
    import os

    import torch

    from clims_pipeline import clip_training
    from clims_pipeline.toy import clip as toy_clip
    from clims_pipeline.toy import world as toyworld

    torch.set_num_threads(1)  # tiny models: threads only spin on a shared CPU
    if os.environ.get("CLIMS_TOY_WORLD") and os.environ.get("CLIMS_TOY_CLIP"):
        world, checkpoint = Path(os.environ["CLIMS_TOY_WORLD"]), Path(os.environ["CLIMS_TOY_CLIP"])
    else:
        world, checkpoint = tmp_path / "world", tmp_path / "clip.pt"
        toyworld.generate_toy_world(world, n_train=4000, n_val=50, n_train_eval=1000, progress=False)
        samples = toy_clip.toy_world_samples(world)
        clip_training.train_clip(
            samples,
            model_name=toy_clip.TOY_CLIP_CONFIG,
            **toy_clip.TOY_FROM_SCRATCH,
            batch_size=128,
            out_path=checkpoint,
            progress=False,
        )
    registry, scores = mine_toy_world(world, checkpoint)
    for class_name in toyworld.TOY_CLASSES:
        own_words = set(toyworld.BACKGROUND_TERMS[toyworld.CLASS_BACKGROUND[class_name]])
        mined = registry.class_backgrounds.get(class_name, ())  # the top 3 once object synonyms are excluded
        # Multi-word terms of the default vocabulary count by their words ("rail track" is a track).
        assert any(set(term.split()) & own_words for term in mined), (
            f"{class_name}: mined {mined}, own background {sorted(own_words)}; "
            f"best terms {[(e.term, round(e.score, 3)) for e in scores[class_name][:5]]}"
        )


def test_docs_name_the_stage_and_the_option() -> None:
    text = (REPO_ROOT / "docs" / "mining.md").read_text()
    assert "--stages mine_backgrounds" in text and "--backgrounds mined" in text
