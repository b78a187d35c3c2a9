"""The run's one configuration object: presets, type-checked overrides, plug-in sections, --config reruns,
and the provenance that config.json records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pipeline_helpers import run_cli

from clims_pipeline.config import (
    PipelineConfig,
    apply_override,
    build_config,
    config_from_dict,
    register_preset,
)


def test_config_overrides_are_checked() -> None:
    config = build_config("full", "official", "voc")
    assert config.train_clims.prompts == "voc-official" and config.train_clims.train.epochs == 15
    assert build_config("full", "paper", "voc").train_clims.train.schedule == "cosine"
    apply_override(config, "make_cam.scales=[1.0, 0.5]")
    assert config.make_cam.scales == (1.0, 0.5)
    with pytest.raises(ValueError, match="epoch"):
        apply_override(config, "train_cam.epoch=3")


def test_rerun_with_other_settings_is_announced(tmp_path: Path) -> None:
    """Finished stages are reused; a work directory written with other settings says which ones differ."""
    from clims_pipeline.cli import changed_settings, warn_about_changed_settings
    from clims_pipeline.files import write_json

    before = build_config("toy", "paper", "toy")
    path = tmp_path / "config.json"
    write_json(path, {"argv": [], "config": before.to_dict()})
    printed: list[str] = []
    warn_about_changed_settings(printed.append, path, build_config("toy", "paper", "toy"))
    assert printed == []  # tuples read back from JSON as lists still compare equal
    after = build_config("toy", "paper", "toy")
    apply_override(after, "train_cam.optimizer=sgd")
    apply_override(after, "make_cam.scales=[1.0]")
    warn_about_changed_settings(printed.append, path, after)
    assert len(printed) == 1
    assert "(make_cam.scales, train_cam.optimizer)" in printed[0] and "--force" in printed[0]
    old_version = before.to_dict()
    del old_version["train_cam"]["optimizer"]  # a field that an older version did not write
    assert changed_settings(old_version, before.to_dict()) == ["train_cam.optimizer"]
    warn_about_changed_settings(printed.append, tmp_path / "missing.json", after)
    assert len(printed) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train_cam.epochs=abc", "--set train_cam.epochs: expected an integer, got 'abc'"),
        ("train_cam.epochs=2.5", "--set train_cam.epochs: expected an integer, got 2.5"),
        ("train_cam.lr=fast", "--set train_cam.lr: expected a number, got 'fast'"),
        ("make_cam.flip=1", "--set make_cam.flip: expected true or false, got 1"),
        ('make_cam.scales=[1.0,"x"]', r"--set make_cam.scales\[1\]: expected a number, got 'x'"),
        ("data.resize_long=[1]", r"--set data.resize_long: expected a list of 2 values, got \[1\]"),
        (
            "train_clims.loss_weights=3",
            r"--set train_clims.loss_weights: expected dict\[str, float\] \| None, got 3",
        ),
        ("train_cam.epochz=3", r"'train_cam.epochz' is not a config field \(known here: \['epochs'"),
        ("nosection.x=1", r"'nosection' is not a config field \(known here: \['preset'"),
        ("toy_world.n_trian=5", r"'toy_world.n_trian' is not a config field \(known here: \['n_train'"),
        ("train_cam", "expected --set SECTION.FIELD=VALUE, got 'train_cam'"),
    ],
)
def test_set_checks_names_and_value_types(override: str, message: str) -> None:
    config = build_config("toy", "paper", "toy")
    with pytest.raises(ValueError, match=message):
        apply_override(config, override)


def test_set_converts_to_the_field_type() -> None:
    config = build_config("smoke", "paper", "voc")
    apply_override(config, "make_cam.scales=[1, 0.5]")
    apply_override(config, "train_cam.lr=1")
    apply_override(config, "train_cam.max_steps=null")
    apply_override(config, 'train_clims.loss_weights={"otm": 1, "btm": 2, "cbs": 0, "reg": 1}')
    assert config.make_cam.scales == (1.0, 0.5) and isinstance(config.train_cam.lr, float)
    assert config.train_cam.max_steps is None
    assert config.train_clims.loss_weights == {"otm": 1.0, "btm": 2.0, "cbs": 0.0, "reg": 1.0}


def test_plugin_sections_are_set_and_round_trip() -> None:
    config = build_config("toy", "paper", "toy")
    apply_override(config, "toy_world.n_train=64")
    assert config.section("toy_world").n_train == 64
    assert config.to_dict()["toy_world"]["n_train"] == 64
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(KeyError, match="no config section 'nope'; plug-in sections: \\['toy_world'\\]"):
        config.section("nope")


def test_config_from_dict_checks_every_field() -> None:
    values = build_config("smoke", "paper", "voc").to_dict()
    values["train_cam"]["batch_size"] = "eight"
    with pytest.raises(ValueError, match=r"train_cam\.batch_size: expected an integer, got 'eight'"):
        config_from_dict(values)
    values = build_config("smoke", "paper", "voc").to_dict()
    values["train_cam"]["momentun"] = 0.9
    with pytest.raises(ValueError, match=r"train_cam: unknown field\(s\) \['momentun'\]"):
        config_from_dict(values)
    with pytest.raises(ValueError, match="expected a JSON object of config sections, got list"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_presets_data_sets_and_their_errors() -> None:
    assert build_config("full", "paper", "coco").data.train_split == "train"
    assert build_config("full", "paper", "coco").train_clims.prompts == "coco"
    with pytest.raises(
        ValueError, match=r"expected --dataset to be one of \['coco', 'simple', 'toy', 'voc'\], got 'pascal'"
    ):
        build_config("full", "paper", "pascal")
    with pytest.raises(ValueError, match="expected --preset to be one of"):
        build_config("huge", "paper", "voc")
    with pytest.raises(
        ValueError,
        match=r"--preset toy is the toy world's .* got --dataset voc; for 64-pixel images of another data "
        r"set use --preset full --image-size small",
    ):
        build_config("toy", "paper", "voc")
    with pytest.raises(ValueError, match="preset 'smoke' is registered twice"):
        register_preset("smoke", lambda config: None)


def test_config_json_records_the_run_and_reruns_with_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--print-config of a recorded config equals the recorded config; provenance names the packages."""
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    argv = [
        "--voc-root",
        voc,
        "--workdir",
        tmp_path / "w",
        "--preset",
        "smoke",
        "--seed",
        "3",
        "--print-config",
    ]
    assert run_cli([*argv, "--set", "train_cam.lr=0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["train_cam"]["lr"] == 0.5
    assert printed["data"]["root"] == str(voc.resolve())
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"config": printed}))
    assert run_cli(["--config", recorded, "--workdir", tmp_path / "w2", "--print-config"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == printed
    with pytest.raises(SystemExit, match=r"--config .*nothing.json: cannot read it as JSON"):
        run_cli(["--config", tmp_path / "nothing.json", "--print-config"])


def test_provenance_lists_versions_and_file_hashes(tmp_path: Path) -> None:
    from clims_pipeline.cli import provenance

    weights = tmp_path / "backbone.pt"
    weights.write_bytes(b"weights")
    config: PipelineConfig = build_config("smoke", "paper", "voc")
    config.network.weights = str(weights)
    record = provenance(config)
    assert record["packages"]["torch"] and record["packages"]["clims-loss"]
    assert record["files"]["network.weights"] == {
        "path": str(weights.resolve()),
        "sha256": hashlib.sha256(b"weights").hexdigest(),
    }
    assert "train_aff.weights" not in record["files"]  # "imagenet" is a tag, not a file


def test_config_rerun_keeps_the_recorded_variant_and_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    base = ["--voc-root", voc, "--workdir", tmp_path / "w", "--preset", "smoke", "--print-config"]
    assert run_cli([*base, "--variant", "official", "--seed", "4", "--set", "train_cam.lr=0.3"]) == 0
    recorded = tmp_path / "config.json"
    recorded.write_text(json.dumps({"config": json.loads(capsys.readouterr().out)}))
    assert run_cli(["--config", recorded, "--workdir", tmp_path / "w2", "--print-config"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["variant"], again["seed"], again["train_cam"]["lr"]) == ("official", 4, 0.3)


def test_a_bad_set_value_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    with pytest.raises(SystemExit) as stopped:
        run_cli(["--voc-root", voc, "--workdir", tmp_path, "--set=train_cam.epochs=many", "--print-config"])
    assert stopped.value.code == 2
    assert "--set train_cam.epochs: expected an integer, got 'many'" in capsys.readouterr().err
