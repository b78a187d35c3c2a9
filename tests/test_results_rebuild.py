"""A damaged results.json is moved aside (named in a warning) and rebuilt from the stages' own result files
(``<workdir>/<stage>/result_<key>.json``): it never costs a figure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pipeline_helpers import make_mini_voc, run_tiny

from clims_pipeline.files import update_results


def _run(voc: Path, workdir: Path, stages: str) -> int:
    return run_tiny(voc, workdir, stages)


def test_report_rebuilds_a_damaged_results_json_from_eval_cam_and_keeps_the_cam_figure(
    tmp_path: Path,
) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=8, val=1)
    workdir = tmp_path / "w"
    assert _run(voc, workdir, "train_cam,train_clims,make_cam,eval_cam") == 0
    own = json.loads((workdir / "eval_cam" / "result_cam.json").read_text())
    assert own == json.loads((workdir / "results.json").read_text())["cam"]
    results = workdir / "results.json"
    results.write_text('{"cam": {"miou": 1')  # cut short
    with pytest.warns(UserWarning) as warned:
        assert _run(voc, workdir, "report") == 0
    (aside,) = workdir.glob("results.json.damaged-*")
    assert aside.read_text() == '{"cam": {"miou": 1'  # kept for the user
    message = " ".join(str(w.message) for w in warned)
    assert f"{results} is damaged" in message and f"moved it aside to {aside}" in message
    assert json.loads(results.read_text())["cam"] == own
    assert re.search(rf"\| CAM \| {own['miou']:.2f} \|", (workdir / "results.md").read_text())


def test_update_results_rebuilds_the_other_stages_entries(tmp_path: Path) -> None:
    (tmp_path / "make_rw").mkdir()
    (tmp_path / "make_rw" / "result_rw.json").write_text(json.dumps({"miou": 60.0}))
    (tmp_path / "results.json").write_text("{")
    with pytest.warns(UserWarning, match=r"results\.json is damaged.*rebuilt"):
        merged = update_results(tmp_path / "results.json", {"cam": {"miou": 50.0}})
    assert merged == {"rw": {"miou": 60.0}, "cam": {"miou": 50.0}}
    assert json.loads((tmp_path / "results.json").read_text()) == merged
