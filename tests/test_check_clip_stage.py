"""Stage check_clip: the readiness report on a mini VOC, without masks, under the run-state protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_helpers import make_mini_voc, run_tiny

from clims_pipeline.data import VOCSource


def test_report_is_written_without_masks_reused_and_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=12, val=2)
    workdir = tmp_path / "run"
    assert run_tiny(voc, workdir, "train_cam") == 0  # derives and caches the labels

    def no_masks(self: VOCSource, image_id: str) -> None:
        raise AssertionError(f"check_clip read the mask of {image_id}")

    monkeypatch.setattr(VOCSource, "load_mask", no_masks)
    capsys.readouterr()
    assert run_tiny(voc, workdir, "check_clip") == 0
    printed = capsys.readouterr().out

    report = json.loads((workdir / "check_clip" / "readiness.json").read_text())
    assert len(report["classes"]) == 20 and report["images"] == 12
    assert set(report["at_risk"]) == {c["name"] for c in report["classes"] if c["flags"]}
    table = (workdir / "check_clip" / "readiness.md").read_text()
    assert (
        table.startswith("# CLIP readiness: clims-smoke-vit (none), prompts 'voc'") and "| person |" in table
    )
    results = json.loads((workdir / "results.json").read_text())["clip_readiness"]
    assert results["at_risk"] == report["at_risk"] and results["images"] == 12
    said = "classes at risk of collapse" if report["at_risk"] else "no class at risk of collapse"
    assert said in printed
    for name in report["at_risk"]:
        assert f"[check_clip]   {name}: " in printed

    # Current: reused, and the classes at risk are said again.
    assert run_tiny(voc, workdir, "check_clip") == 0
    printed = capsys.readouterr().out
    assert "[check_clip] done already" in printed and said in printed
    # Another setting: recomputed, naming it.
    assert run_tiny(voc, workdir, "check_clip", "--set=check_clip.margin=0.5") == 0
    printed = capsys.readouterr().out
    assert "recomputing" in printed and "settings.margin" in printed
    # A margin of 0.5 flags every class whose views are within 0.5 of the object: with a random CLIP, all.
    measured = [
        c["name"]
        for c in json.loads((workdir / "check_clip" / "readiness.json").read_text())["classes"]
        if c["images"]
    ]
    assert json.loads((workdir / "check_clip" / "readiness.json").read_text())["at_risk"] == measured

    # stop_if_at_risk stops the pipeline before train_clims.
    with pytest.raises(
        RuntimeError, match=r"check_clip: classes at risk of collapse: .*stop_if_at_risk=false"
    ):
        run_tiny(
            voc,
            workdir,
            "check_clip,train_clims",
            "--set=check_clip.margin=0.5",
            "--set=check_clip.stop_if_at_risk=true",
        )
    assert not (workdir / "train_clims" / "model.pt").exists()


def test_bad_settings_stop_the_run_before_any_stage(tmp_path: Path) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=4, val=1)
    with pytest.raises(
        ValueError, match=r"check_clip.min_separation: expected a number in \[0, 1\].*got 1.5"
    ):
        run_tiny(voc, tmp_path / "run", "train_cam,check_clip", "--set=check_clip.min_separation=1.5")
    assert not (tmp_path / "run" / "train_cam" / "model.pt").exists()
