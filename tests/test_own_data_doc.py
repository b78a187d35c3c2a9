"""docs/own-data.md: every command of the page runs, from a demo folder to CAM mIoU.

The slow test runs the page's commands exactly as written, each in a fresh shell; the default test runs the
same commands in this process (no interpreter start per command, which costs most of the slow test's time).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "own-data.md").read_text(encoding="utf-8")


def page_commands() -> list[str]:
    """The commands of the page's ``bash`` blocks, in order, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", PAGE, re.S):
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def check_results(workdir: Path) -> None:
    """Both CAM evaluations ran on the demo's val split and report a per-class table of its classes."""
    results = json.loads((workdir / "results.json").read_text(encoding="utf-8"))
    for key in ("cam_baseline", "cam"):
        assert results[key]["split"] == "val"
        assert set(results[key]["per_class"]) == {"background", "ball", "box", "kite"}
        assert 0.0 <= results[key]["miou"] <= 100.0
    readiness = json.loads((workdir / "check_clip" / "readiness.json").read_text(encoding="utf-8"))
    assert len(readiness["classes"]) == 3 and isinstance(readiness["at_risk"], list)


def test_the_page_starts_with_the_demo_and_checks_the_clip_before_clims() -> None:
    commands = page_commands()
    assert commands[0] == "python -m clims_pipeline.demo_data demo"
    assert all(c.split()[0] in ("python", "clims-pipeline", "cat") for c in commands)
    check = next(i for i, c in enumerate(commands) if c.endswith("--stages check_clip"))
    clims = next(i for i, c in enumerate(commands) if "--stages train_clims" in c)
    baseline = next(i for i, c in enumerate(commands) if "--stages train_cam" in c)
    assert baseline < check < clims


def test_page_commands_run_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clims_pipeline import demo_data
    from clims_pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    for command in page_commands():
        program, *args = shlex.split(command)
        if program == "python":
            assert args[:2] == ["-m", "clims_pipeline.demo_data"]
            demo_data.main(args[2:])
        elif program == "clims-pipeline":
            assert main(args) == 0
        else:
            assert program == "cat"
            printed += [Path(name).read_text(encoding="utf-8") for name in args]
    check_results(tmp_path / "demo" / "run")
    assert "CAM mIoU: cam_baseline" in printed[0] and "CAM mIoU: cam" in printed[1]
    registry = json.loads((tmp_path / "demo" / "registry.json").read_text(encoding="utf-8"))
    assert registry["class_names"] == ["ball", "box", "paper kite"]  # the class file's prompt words
    assert registry["template"] == "a photo of a {}."


@pytest.mark.slow
def test_page_commands_run_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    for command in page_commands():
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    check_results(tmp_path / "demo" / "run")
