"""The check-cost measurement of benchmarks/bench_evaluator.py runs and reports its figures (tiny CLIP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIG
from test_benchmark_smoke import load_bench


def test_check_cost_only_prints_the_fraction_of_a_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench()
    out = tmp_path / "cost.json"
    arguments = [
        "--model-config", json.dumps(TINY_CONFIG), "--batch", "2", "--pairs", "3", "--image-size", "48",
        "--cam-size", "8", "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu",
        "--in-process", "--check-cost-only", "--json", str(out),
    ]  # fmt: skip
    report = bench.main(arguments)
    printed = capsys.readouterr().out
    assert "value checks" in printed and "first call only" in printed and "% of a step" in printed
    cost = json.loads(out.read_text())["check_cost"]
    assert cost == report["check_cost"]
    assert cost["step_s"] > 0 and cost["value_checks_s"] >= 0 and cost["first_call_range_read_s"] > 0
    assert 0 <= cost["later_step_check_fraction"] <= cost["first_step_check_fraction"]
