"""The README's promises: the quick start runs as written, CI runs the README's test command, docs build."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section_code(heading: str, language: str) -> str:
    section = README.split(heading, 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_quick_start_runs_as_written_and_prints_the_four_terms() -> None:
    code = _section_code("## Quick start (runs as written)", "python")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    printed = eval(result.stdout.strip().splitlines()[-1])  # the dict the snippet prints
    assert set(printed) == {"loss", "otm", "btm", "cbs", "reg"}
    assert all(isinstance(v, float) and v == v for v in printed.values())


def test_examples_quickstart_is_the_readme_code() -> None:
    code = _section_code("## Quick start (runs as written)", "python")
    assert code in (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README.split("## Set-up on a fresh machine", 1)[1], re.S)
    test_command = commands[1].strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert test_command in ci_lines


def test_docs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
