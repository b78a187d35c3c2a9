"""The toy-world ablation (benchmarks/toyworld_ablation.py) runs its whole code path on a tiny world.

One seed, a 64-image world, a CLIP trained for 2 steps and 2-3 training steps per network: this checks
the plumbing (world -> CLIP -> baseline -> four CLIMS rows -> sweep -> JSON, table, PNG), not the
numbers. The real ablation is the slow test below, which checks the issue's targets (measured: 14 min 4 s
on 2 shared CPU cores, world and CLIP included).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "toyworld_ablation.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("toyworld_ablation", BENCH_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {BENCH_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ablation_code_path_on_a_tiny_world(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "out.json"
    bench.main(
        [
            "--workdir", str(tmp_path / "work"), "--json", str(out), "--seeds", "0",
            "--n-train", "64", "--n-val", "16", "--clip-steps", "2", "--cam-steps", "3", "--clims-steps", "2",
            "--clip-corpus", "web_dark", "--clip-cutouts", "16", "--clip-backgrounds", "12",
            "--grid-rows", "2",
        ]
    )  # fmt: skip
    summary = json.loads(out.read_text())
    assert set(summary["rows"]) == {"baseline", "otm", "otm_btm", "otm_btm_reg", "full"}
    for row in summary["rows"].values():
        assert 0.0 <= row["miou_mean"] <= 100.0 and row["miou_std"] == 0.0
    assert set(summary["cooccurring_iou"]) >= {"without_cbs", "with_cbs"}
    assert (tmp_path / "work" / "ablation_overlays.png").stat().st_size > 0
    assert "| + L_CBS (full CLIMS) |" in (tmp_path / "work" / "ablation.md").read_text()


@pytest.mark.slow
def test_full_ablation(tmp_path: Path) -> None:
    summary = load_bench().main(["--workdir", str(tmp_path), "--json", str(tmp_path / "out.json")])
    rows = summary["rows"]
    assert rows["full"]["miou_mean"] >= rows["baseline"]["miou_mean"] + 10.0
    cooccurring = summary["cooccurring_iou"]
    assert cooccurring["with_cbs"] >= cooccurring["without_cbs"] + 15.0


def test_rows_and_backgrounds_options(tmp_path: Path) -> None:
    """--rows picks rows; --backgrounds puts a registry file's terms (e.g. mined) into the CBS prompts."""
    import argparse

    import clims_loss as cl

    bench = load_bench()  # puts examples/ on the path
    from clims_pipeline.toy import experiment as toy_experiment
    from clims_pipeline.toy.world import TOY_CLASSES

    mined = {name: [f"{name} place", "ground"] for name in TOY_CLASSES}
    path = tmp_path / "mined.json"
    toy_experiment.toy_registry().replace(class_backgrounds=mined).to_json(path)
    args = argparse.Namespace(
        cam_steps=None,
        clims_steps=None,
        eval_images=None,
        train_images=None,
        rows="baseline,full",
        backgrounds=path,
    )
    settings = bench.settings_from_toy_preset(args)
    assert settings.rows == ("baseline", "full") and settings.class_backgrounds == mined
    registry = toy_experiment.toy_registry(class_backgrounds=settings.class_backgrounds)
    assert registry.backgrounds_for("boat") == ("boat place", "ground")
    assert registry.cbs_reduction == toy_experiment.toy_registry().cbs_reduction
    with pytest.raises(SystemExit, match="expected names"):
        bench.settings_from_toy_preset(argparse.Namespace(**{**vars(args), "rows": "baseline,fulll"}))
    partial = tmp_path / "partial.json"
    cl.BackgroundPromptRegistry(name="p", class_names=("boat",), class_backgrounds={"boat": ["sea"]}).to_json(
        partial
    )
    with pytest.raises(SystemExit, match="no background terms"):
        bench.settings_from_toy_preset(argparse.Namespace(**{**vars(args), "backgrounds": partial}))


def test_loss_landscape_script_on_a_tiny_world(tmp_path: Path) -> None:
    """benchmarks/toyworld_loss_landscape.py reports every map family; REG grows with the maps' area."""
    spec = importlib.util.spec_from_file_location(
        "toyworld_loss_landscape", BENCH_PATH.with_name("toyworld_loss_landscape.py")
    )
    assert spec is not None and spec.loader is not None
    landscape = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(landscape)
    import open_clip
    import torch

    from clims_pipeline.toy import clip as toy_clip
    from clims_pipeline.toy import world as toyworld

    world = tmp_path / "world"
    toyworld.generate_toy_world(world, n_train=8, n_val=6, n_background_only=0, progress=False)
    checkpoint = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(toy_clip.TOY_CLIP_CONFIG).state_dict(), checkpoint)
    out = tmp_path / "landscape.json"
    report = landscape.main(["--world", str(world), "--clip", str(checkpoint), "--json", str(out)])
    assert set(landscape.MAP_FAMILIES) <= set(report) and json.loads(out.read_text())["ones"]["reg"] == 1.0
    assert report["ground_truth"]["reg"] < report["dil3"]["reg"] < report["dil8"]["reg"] < 1.0


def test_evaluate_cams_precision_and_recall_say_where_a_map_went() -> None:
    """A map exactly on the object: precision = recall = 100; the object plus as much background: 50 / 100."""
    import numpy as np
    import torch

    load_bench()  # puts examples/ on the path
    from clims_pipeline.toy import experiment as toy_experiment

    masks = torch.zeros(1, 8, 8, dtype=torch.int64)
    masks[0, 2:4, 2:6] = 1  # 8 pixels of class 1 ("boat")
    data = toy_experiment.SplitTensors(
        ids=["a"],
        images=torch.zeros(1, 3, 8, 8),
        masks=masks,
        labels=torch.tensor([[1.0]]),
        raw=np.zeros((1, 8, 8, 3), np.uint8),
    )
    exact = (masks == 1).float().unsqueeze(1)
    spread = exact.clone()
    spread[0, 0, 4:6, 2:6] = 1.0  # 8 more pixels below the object (its water)
    thresholds = np.array([0.5])
    on_object = toy_experiment.evaluate_cams(exact, data, ["boat"], thresholds)
    on_water = toy_experiment.evaluate_cams(spread, data, ["boat"], thresholds)
    assert on_object["precision"]["boat"] == on_object["recall"]["boat"] == 100.0
    assert on_water["precision"]["boat"] == 50.0 and on_water["recall"]["boat"] == 100.0
    assert on_water["per_class"]["boat"] == 50.0
