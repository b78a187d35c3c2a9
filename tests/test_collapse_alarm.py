"""train_clims's collapse alarm: a class made to die at a known step is reported within log_every steps."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from pipeline_helpers import make_mini_voc, run_tiny

from clims_pipeline.collapse_alarm import reference_indices
from clims_pipeline.networks import CLIMSNet

LOG_EVERY = 4
COLLAPSE_STEP = 6  # the first training step whose maps of the chosen class are zero
ALARM_ARGS = (
    f"--set=train_clims.train.log_every={LOG_EVERY}",
    "--set=train_clims.train.max_steps=14",
    "--set=train_clims.train.epochs=4",
)


def test_a_class_killed_at_a_known_step_is_reported_within_log_every_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=16, val=2)
    workdir = tmp_path / "run"
    assert run_tiny(voc, workdir, "train_cam") == 0
    labels = json.loads((workdir / "cache" / "labels_voc_train.json").read_text())["labels"]
    target, _ = Counter(k for ks in labels.values() for k in ks).most_common(1)[0]  # the most frequent class
    from clims_loss import VOC_CLASSES

    name = VOC_CLASSES[target]

    original = CLIMSNet.forward
    steps = {"seen": 0}

    def dying_forward(self: CLIMSNet, images: torch.Tensor) -> torch.Tensor:
        maps = original(self, images)
        if not torch.is_grad_enabled():  # the alarm's reference pass, not a training step
            return maps
        steps["seen"] += 1
        if steps["seen"] >= COLLAPSE_STEP:
            keep = torch.ones(maps.shape[1], device=maps.device)
            keep[target] = 0.0
            maps = maps * keep.view(1, -1, 1, 1)
        return maps

    monkeypatch.setattr(CLIMSNet, "forward", dying_forward)
    capsys.readouterr()
    assert run_tiny(voc, workdir, "train_clims", *ALARM_ARGS) == 0
    printed = capsys.readouterr().out

    alarms = [
        (int(step), text)
        for step, text in re.findall(r"\[train_clims\] WARNING step (\d+): (.*)", printed)
        if text.startswith(f"class {name!r} collapsed")
    ]
    assert alarms, printed
    step, text = alarms[0]
    assert COLLAPSE_STEP <= step <= COLLAPSE_STEP + LOG_EVERY - 1
    assert re.fullmatch(
        rf"class '{name}' collapsed: mean activation 0\.0000 on the images that contain it, "
        rf"below 0\.25 x the baseline's \d\.\d{{4}} \(steps \d+-{step}\)",
        text,
    ), text
    assert (
        "collapsed at the last step: " in printed and name in printed.split("collapsed at the last step: ")[1]
    )

    records = [json.loads(line) for line in (workdir / "logs" / "train_clims.jsonl").read_text().splitlines()]
    events = [r for r in records if r["event"] == "collapse" and r["class"] == name]
    assert events[0]["step"] == step and events[0]["positive_mean"] == 0.0 and events[0]["vanished"]
    logged = [r for r in records if r["event"] == "class_activation"]
    assert [r["step"] for r in logged] == [4, 8, 12, 14]
    after = [r["positive"][name] for r in logged[2:]]  # steps 9-14: all after the collapse
    # None: no batch of those steps had the class
    assert logged[0]["positive"][name] > 0 and 0.0 in after and set(after) <= {0.0, None}
    assert next(r for r in records if r["event"] == "collapse_reference")["positive"][name] > 0


def test_reference_images_cover_every_class_up_to_the_cap() -> None:
    labels = [
        torch.tensor([1.0, 0, 0]),
        torch.tensor([1.0, 1, 0]),
        torch.tensor([1.0, 0, 0]),
        torch.tensor([0, 0, 1.0]),
    ]
    assert reference_indices(labels, 1) == [0, 1, 3]
    assert reference_indices(labels, 2) == [0, 1, 3]
    assert reference_indices(labels, 3) == [0, 1, 2, 3]


def test_alarm_settings_are_checked_before_training(tmp_path: Path) -> None:
    from clims_pipeline.collapse_alarm import check_alarm_settings
    from clims_pipeline.config import CollapseAlarmConfig

    with pytest.raises(
        ValueError, match=r"train_clims.collapse_alarm.fraction: expected a number in \[0, 1\], got 2"
    ):
        check_alarm_settings(CollapseAlarmConfig(fraction=2))
    with pytest.raises(ValueError, match="reference_images: expected an integer >= 1, got 0"):
        check_alarm_settings(CollapseAlarmConfig(reference_images=0))
