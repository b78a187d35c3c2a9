"""docs/pipeline.md's GPU commands of the official improved pipeline with IRNet run as written, with
``--preset smoke`` instead of ``--preset full`` (and a small VOC copy and a temporary work directory): one
process, and ``torchrun`` with two (slow: two full pipelines)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from pipeline_helpers import REPO_ROOT, make_mini_voc, run_subprocess

from clims_pipeline.crf import crf_available

PAGE = REPO_ROOT / "docs" / "pipeline.md"
SECTION = "### The official improved pipeline with IRNet, all stages (GPU)"


def documented_commands() -> list[list[str]]:
    """The section's bash blocks, each one command line split into arguments."""
    section = PAGE.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    return [shlex.split(block.replace("\\\n", " ")) for block in blocks]


def test_the_section_holds_a_single_gpu_and_a_torchrun_command_of_the_official_variant() -> None:
    commands = documented_commands()
    assert [command[0] for command in commands] == ["python", "torchrun"]
    for command in commands:
        for flag, value in (("--stages", "all"), ("--preset", "full"), ("--variant", "official")):
            assert command[command.index(flag) + 1] == value
    assert "not run at full size" in PAGE.read_text(encoding="utf-8")


def as_smoke_run(command: list[str], voc: Path, workdir: Path) -> tuple[list[str], int]:
    """The command's pipeline arguments with the preset, data and work directory replaced, and its
    number of processes."""
    entry = command.index("examples/voc_full_pipeline.py")
    nproc = next((int(a.split("=", 1)[1]) for a in command[:entry] if a.startswith("--nproc_per_node=")), 1)
    args = command[entry + 1 :]
    replacements = {"--preset": "smoke", "--voc-root": str(voc), "--workdir": str(workdir)}
    for flag, value in replacements.items():
        args[args.index(flag) + 1] = value
    return args, nproc


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["python", "torchrun"])
def test_documented_command_runs_with_the_smoke_preset(which: int, tmp_path: Path) -> None:
    if not crf_available():
        pytest.skip("pydensecrf2 missing: the commands run the label CRF and eval_seg's CRF")
    voc = make_mini_voc(tmp_path / "voc", train=10, val=2)  # train_seg's batch of 10 needs 10 images
    args, nproc = as_smoke_run(documented_commands()[which], voc, tmp_path / "run")
    run = run_subprocess(args, nproc=nproc, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"cam", "irn", "seg"} <= set(results) and "rw" not in results
    assert results["seg"]["mask_source"] == "make_sem_seg"
    assert f"processes {nproc}" in run.stdout


def test_the_smoke_substitution_keeps_every_other_argument() -> None:
    command = documented_commands()[1]
    args, nproc = as_smoke_run(command, Path("/v"), Path("/w"))
    assert nproc == 2
    original = command[command.index("examples/voc_full_pipeline.py") + 1 :]
    changed = [(a, b) for a, b in zip(original, args, strict=True) if a != b]
    assert changed == [("VOCdevkit/VOC2012", "/v"), ("runs/voc_official_irn", "/w"), ("full", "smoke")]
