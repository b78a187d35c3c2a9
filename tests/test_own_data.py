"""A data set's own classes (class files, the simple layout, the VOC layout), composable image sizes, the
prompt recipe on the command line, and make_cam on part of a split."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import make_mini_voc, run_cli

from clims_pipeline import demo_data
from clims_pipeline.cli import build_parser
from clims_pipeline.clip_setup import registry_for
from clims_pipeline.config import build_config
from clims_pipeline.data import DatasetError, build_source, check_split, read_class_file
from clims_pipeline.networks import BACKBONE_BUILDERS
from clims_pipeline.runstate import changed_fields
from clims_pipeline.toy.preset import apply_toy_preset


def flat(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict()))


# ----------------------------------------------------------------------------- presets that compose
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_toy_preset_is_small_images_plus_the_toy_world(variant: str) -> None:
    composed = build_config("full", variant, "toy", image_size="small")
    apply_toy_preset(composed)
    toy = build_config("toy", variant, "toy")
    assert flat(dataclasses.replace(composed, preset="toy")) == flat(toy)
    # The small image size is the same whatever the data set, and the toy world changes none of its fields
    # but the walk settings chosen on the toy world's train split (it adds a CLIMS step bound, which the
    # small size leaves open).
    small_voc = flat(build_config("full", variant, "voc", image_size="small"))
    changed = changed_fields(flat(build_config("full", variant, "voc")), small_voc)
    assert "network.backbone" in changed and "data.crop_size" in changed
    differ = [
        name for name in changed if name != "image_size" and _get(flat(toy), name) != _get(small_voc, name)
    ]
    assert sorted(differ) == ["make_rw.crf", "make_rw.exponent"]
    assert toy.train_clims.train.max_steps is not None


def _get(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def test_toy_preset_with_another_data_set_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        run_cli(["--preset", "toy", "--dataset", "voc", "--data-root", tmp_path, "--workdir", tmp_path])
    assert raised.value.code == 2
    assert "use --preset full --image-size small" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"--preset toy is made for --image-size small, got --image-size paper"
    ):
        build_config("toy", "paper", "toy", image_size="paper")


def test_backbone_choices_are_the_backbone_registry() -> None:
    action = next(a for a in build_parser()._actions if a.dest == "backbone")
    assert tuple(action.choices or ()) == tuple(BACKBONE_BUILDERS) and "small" in BACKBONE_BUILDERS


# ----------------------------------------------------------------------------- class files
def test_class_list_names_prompt_words_and_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# comment\nboat: a boat\n\ncar\n")
    class_set = read_class_file(path)
    assert class_set.names == ("boat", "car") and class_set.prompt_words == ("a boat", "car")
    path.write_text("boat\ncar\nboat: ship\n")
    with pytest.raises(
        DatasetError, match=r"classes.txt line 3: class 'boat' is listed twice \(first on line 1\)"
    ):
        read_class_file(path)
    path.write_text("boat:\n")
    with pytest.raises(DatasetError, match=r"line 1: expected 'name' or 'name: prompt words', got 'boat:'"):
        read_class_file(path)


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    demo_data.write_demo_data(root, images=8)  # 2 val, 6 train
    return root


def test_simple_layout_labels_and_prompts_follow_the_class_file(demo: Path, tmp_path: Path) -> None:
    source = build_source("simple", str(demo), tmp_path / "cache")
    assert source.class_names == ("ball", "box", "kite") and len(source.ids("train")) == 6
    assert len(source.ids("all")) == 8
    row = (demo / "labels.csv").read_text().splitlines()[1].split(",")
    names = row[1].split(";")
    assert [source.class_names[k] for k in source.compute_labels(Path(row[0]).stem)] == names
    config = build_config("full", "paper", "simple")
    registry = registry_for(config, source)
    assert registry.object_prompts() == ["a photo of ball.", "a photo of box.", "a photo of paper kite."]
    assert registry.weights.cbs == 0.0  # no backgrounds yet, so no CBS
    (demo / "splits").mkdir()
    (demo / "splits" / "train.txt").write_text("demo_003.png\ndemo_004\n")
    assert source.ids("train") == ["demo_003", "demo_004"]  # a list file wins over the column


def test_simple_layout_preflight_names_file_line_and_value(demo: Path, tmp_path: Path) -> None:
    lines = (demo / "labels.csv").read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "ball;bal")  # image 2: an unknown class
    (demo / "labels.csv").write_text("\n".join(lines) + "\n")
    (demo / "images" / "demo_005.png").unlink()
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:4, :4] = 9
    Image.fromarray(mask, mode="L").save(demo / "masks" / "demo_001.png")
    source = build_source("simple", str(demo), tmp_path / "cache")
    _, problems = check_split(source, "all", need_masks=True)
    messages = dict(problems)
    assert (
        f"{demo / 'labels.csv'} line 4: unknown class 'bal' for image 'demo_002'" in messages["unknown class"]
    )
    assert "declares ball, box, kite" in messages["unknown class"]
    assert messages["missing image"].startswith(f"missing image: {demo / 'images' / 'demo_005.png'}")
    assert "named on line 7 of labels.csv" in messages["missing image"]
    assert (
        f"mask {demo / 'masks' / 'demo_001.png'} holds value 9 (16 pixels); expected 0..3"
        in messages["mask value out of range"]
    )


def test_simple_layout_errors_without_classes_or_splits(demo: Path, tmp_path: Path) -> None:
    (demo / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"--dataset simple needs its classes: put a class list"):
        build_source("simple", str(demo), tmp_path)
    rows = [line.rsplit(",", 1)[0] for line in (demo / "labels.csv").read_text().splitlines()]
    (demo / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"missing class file: .*c.txt"):
        build_source("simple", str(demo), tmp_path, classes=str(tmp_path / "c.txt"))
    (tmp_path / "c.txt").write_text("ball\nbox\nkite\n")
    source = build_source("simple", str(demo), tmp_path, classes=str(tmp_path / "c.txt"))
    with pytest.raises(DatasetError, match=r"has no split column; .* or use split 'all'"):
        source.ids("train")


def test_registry_must_fit_the_data_set_and_recipe_flags_are_checked(demo: Path, tmp_path: Path) -> None:
    source = build_source("simple", str(demo), tmp_path)
    config = build_config("full", "official", "simple")
    config.train_clims.prompts = "voc"
    with pytest.raises(
        ValueError, match=r"the prompt preset 'voc' has 20 classes .* the simple data .* has 3"
    ):
        registry_for(config, source)
    config.train_clims.prompts = "dataset"
    config.train_clims.cbs_reduction = "mean"
    config.train_clims.reg_positive_only = True
    config.train_clims.template = "a photo of a {}."
    registry = registry_for(config, source)
    assert (registry.cbs_reduction, registry.reg_positive_only) == ("mean", True)
    assert registry.cbs_threshold == 0.26  # the official recipe's, kept
    assert registry.object_prompts()[0] == "a photo of a ball."
    config.train_clims.cbs_reduction = "avg"
    with pytest.raises(ValueError, match=r"train_clims.cbs_reduction='avg'.*cbs_reduction"):
        registry_for(config, source)


def test_voc_layout_takes_a_class_file_and_keeps_voc_without(tmp_path: Path) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=2, val=1)
    assert build_source("voc", str(voc), tmp_path).num_classes == 20  # no class file: VOC's 20
    (voc / "classes.txt").write_text("thing: object\nother\n")
    source = build_source("voc", str(voc), tmp_path)
    assert source.class_names == ("thing", "other")
    config = build_config("full", "paper", "voc")
    assert registry_for(config, source).class_names == ("object", "other")
    first = source.ids("train")[0]
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0, :3] = (1, 2, 3)
    Image.fromarray(mask, mode="L").save(source.mask_path(first))
    assert source.compute_labels(first) == [0, 1]
    problems = source.check_label_file(source.mask_path(first), None)
    assert problems == [
        (
            "mask value out of range",
            f"mask {source.mask_path(first)} holds value 3 (1 pixels); expected 0..2 (background and the 2 "
            "classes) or void 255",
        )
    ]
    with pytest.raises(DatasetError, match=r"--dataset coco has its own classes"):
        build_source("coco", str(tmp_path), tmp_path, classes=str(voc / "classes.txt"))


# ----------------------------------------------------------------------------- make_cam on part of a split
def test_no_masks_skips_eval_and_cam_limit_infers_a_few(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(demo / "masks")
    workdir = tmp_path / "run"
    args = ["--data-root", demo, "--workdir", workdir, "--image-size", "small", "--seed", "1"]
    fast = [
        "--set",
        "train_cam.batch_size=2",
        "--set",
        "train_cam.max_steps=1",
        "--set",
        "make_cam.scales=[1.0]",
    ]
    assert (
        run_cli(
            [*args, *fast, "--stages", "train_cam,make_cam,eval_cam", "--cam-limit", "1", "--cam-eval-only"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[eval_cam] skipped: the simple data at" in out and "has no masks for split 'val'" in out
    assert [p.name for p in (workdir / "make_cam" / "train_cam").glob("*.npy")] == ["demo_000.npy"]
    with pytest.raises(ValueError, match=r"train_aff read\(s\) the CAMs of the whole training split"):
        run_cli([*args, *fast, "--stages", "make_cam,train_aff", "--cam-eval-only"])
