"""The pipeline package's structure: no import cycle, no stage importing another, no sys.path patching,
and a pipeline that runs without its toy-world plug-in."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from pipeline_helpers import FAST_SMOKE_ARGS, REPO_ROOT, require_voc_sample

PACKAGE = REPO_ROOT / "clims_pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, function-local imports included."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_function_local_imports() -> None:
    graph = import_graph()
    # The CLI imports the stage package, which imports every stage module.
    assert "clims_pipeline.stages" in graph["clims_pipeline.cli"]
    assert "clims_pipeline.stages.make_cam" in graph["clims_pipeline.stages"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_pipeline_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def imports_between(source_prefix: str, target_prefix: str) -> list[tuple[str, str]]:
    return [
        (source, target)
        for source, targets in import_graph().items()
        for target in targets
        if source.startswith(source_prefix) and target.startswith(target_prefix)
    ]


def test_no_stage_module_imports_another() -> None:
    assert imports_between("clims_pipeline.stages.", "clims_pipeline.stages.") == []


def test_nothing_outside_the_toy_package_imports_it() -> None:
    outside = [
        (source, target)
        for source, target in imports_between("clims_pipeline", "clims_pipeline.toy")
        if not source.startswith("clims_pipeline.toy")
    ]
    assert outside == []


def test_no_file_modifies_sys_path() -> None:
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for folder in ("clims_loss", "clims_pipeline", "examples", "benchmarks", "tests")
        for path in (REPO_ROOT / folder).rglob("*.py")
        if path.name != Path(__file__).name
        and any(token in path.read_text(encoding="utf-8") for token in ("sys.path.insert", "sys.path.append"))
    ]
    assert offenders == []


@pytest.mark.parametrize("argv", [["--print-config"], ["--stages", "nope", "--print-config"]])
def test_pipeline_without_the_toy_plugin_asks_for_a_data_set(argv: list[str]) -> None:
    """With the toy sub-package unimportable there is no data set to fall back to: a clear error."""
    code = (
        "import sys; sys.modules['clims_pipeline.toy'] = None\n"
        "from clims_pipeline.cli import main\n"
        f"main({argv!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode != 0
    assert "name a data set (--voc-root, --coco-root or --data-root)" in run.stderr
    assert "pipeline plug-in 'toy'" in run.stderr  # the skipped plug-in is named


def test_voc_smoke_path_runs_without_the_toy_plugin(tmp_path: Path) -> None:
    voc = require_voc_sample()
    workdir = tmp_path / "run"
    argv = [
        "--voc-root",
        str(voc),
        "--workdir",
        str(workdir),
        "--stages",
        "train_cam,train_clims,make_cam,eval_cam",
        *FAST_SMOKE_ARGS,
        "--set",
        "train_cam.max_steps=2",
        "--set",
        "train_clims.train.max_steps=2",
    ]
    code = (
        "import sys; sys.modules['clims_pipeline.toy'] = None\n"
        "from clims_pipeline.cli import main\n"
        f"raise SystemExit(main({argv!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (workdir / "results.json").is_file()
    assert not any("clims_pipeline.toy" in line for line in run.stderr.splitlines() if "Traceback" in line)
