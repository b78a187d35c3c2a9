"""The evaluator benchmark still runs end to end (tiny CLIP, one step), so that it cannot rot.

This checks that the script works and that its JSON has the documented shape, and that the
official-compat parity holds; it is not a timing test.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import TINY_CONFIG

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_evaluator.py"
TINY_ARGS = [
    "--model-config", json.dumps(TINY_CONFIG),
    "--batch", "2", "--pairs", "3", "--image-size", "48", "--cam-size", "8",
    "--steps", "1", "--warmup", "0", "--threads", "1",
    "--under-floor", "--under-floor-rows", "channels_last,sdpa-math,bf16", "--under-floor-steps", "1",
    "--scaling", "1,3", "--scaling-cap", "2",
]  # fmt: skip


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_evaluator", BENCH_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


def test_benchmark_runs_in_process_and_writes_the_documented_json(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    bench.main([*TINY_ARGS, "--device", "cpu", "--in-process", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "reference/fused" in printed and "+bf16-autocast" in printed

    report = json.loads(out.read_text())
    for name in ("fused", "reference", "floor"):
        assert report["variants"][name]["step_s"] > 0
        assert report["variants"][name]["peak_mem_mb"] > 0
    assert set(report["ratios"]) >= {"reference_over_fused", "fused_over_floor", "mem_fused_over_reference"}
    assert report["variants"]["fused"]["text_encoder_calls_per_step"] == 0
    assert report["variants"]["reference"]["text_encoder_calls_per_step"] == 3
    assert report["loss_parity_max_rel_err"] < 1e-5
    assert set(report["scaling"]) == {"fused@1", "fused@1/cap2", "fused@3", "fused@3/cap2"}
    assert set(report["under_floor"]) >= {"+channels_last", "+sdpa-math", "+bf16-autocast"}


def test_benchmark_worker_runs_a_variant_in_its_own_process(bench: ModuleType) -> None:
    config = bench.BenchConfig(
        model_config=json.dumps(TINY_CONFIG),
        batch=2,
        pairs=2,
        image_size=32,
        cam_size=8,
        steps=1,
        warmup=0,
        threads=1,
    )
    variant = bench.Variant("floor", "floor", "encoder floor")
    task = {
        "kind": "memory",
        "config": bench.dataclasses.asdict(config),
        "variants": [bench.dataclasses.asdict(variant)],
    }
    result = bench._run_in_subprocess(task)
    assert result["peak_mem_mb"] > 0 and result["isolated_step_s"] > 0
