"""Pipeline metrics and file helpers: the one-pass threshold sweep, atomic writes, results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# isort: split
from clims_pipeline.files import atomic_write, update_results
from clims_pipeline.metrics import ThresholdSweep, confusion_matrix, iou_from_confusion, mean_iou


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), num_labels=st.integers(2, 6))
def test_threshold_sweep_equals_one_confusion_matrix_per_threshold(seed: int, num_labels: int) -> None:
    rng = np.random.default_rng(seed)
    thresholds = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    sweep = ThresholdSweep(num_labels, thresholds)
    images = []
    for _ in range(3):
        gt = rng.integers(0, num_labels, size=(7, 9))
        gt[rng.random(gt.shape) < 0.1] = 255
        cls = rng.integers(1, num_labels, size=gt.shape)
        # scores on the threshold grid too, to pin down the strict ">" at ties
        score = np.where(
            rng.random(gt.shape) < 0.3, rng.choice(thresholds, size=gt.shape), rng.random(gt.shape)
        )
        sweep.add(gt, cls, score)
        images.append((gt, cls, score))
    for index, threshold in enumerate(thresholds):
        brute = sum(
            confusion_matrix(gt, np.where(score > threshold, cls, 0), num_labels) for gt, cls, score in images
        )
        np.testing.assert_array_equal(sweep.confusion_at(index), brute)


def test_iou_of_a_known_confusion_matrix() -> None:
    confusion = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]])
    iou = iou_from_confusion(confusion)
    np.testing.assert_allclose(iou[:2], [3 / 5, 2 / 4])
    assert np.isnan(iou[2])  # absent from ground truth and prediction: left out of the mean
    assert mean_iou(iou) == pytest.approx((0.6 + 0.5) / 2)


def test_atomic_write_leaves_no_partial_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing_writer(file) -> None:  # type: ignore[no-untyped-def]
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, failing_writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_update_results_merges_keys(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    update_results(path, {"cam": {"miou": 50.0}})
    merged = update_results(path, {"rw": {"miou": 60.0}})
    assert merged == {"cam": {"miou": 50.0}, "rw": {"miou": 60.0}} == json.loads(path.read_text())


def test_run_logger_writes_jsonl_and_tensorboard_scalars_when_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    from clims_pipeline.context import RunLogger

    scalars: list[tuple[str, float, int]] = []

    class FakeSummaryWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    fake_module = types.ModuleType("torch.utils.tensorboard")
    fake_module.SummaryWriter = FakeSummaryWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_module)
    logger = RunLogger(tmp_path / "logs" / "s.jsonl", tmp_path / "tb", enabled=True)
    logger.log("train", step=3, loss=0.5, note="text")
    logger.close()
    record = json.loads((tmp_path / "logs" / "s.jsonl").read_text())
    assert record["event"] == "train" and record["step"] == 3 and record["loss"] == 0.5
    assert scalars == [("train/loss", 0.5, 3)]
    silent = RunLogger(tmp_path / "other.jsonl", None, enabled=False)  # ranks other than 0
    silent.log("train", step=1, loss=1.0)
    assert not (tmp_path / "other.jsonl").exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    import os
    import stat

    from clims_pipeline.files import save_npy, write_json

    previous = os.umask(umask)
    try:
        written = [
            atomic_write(tmp_path / "a.bin", lambda file: file.write(b"x")),
            write_json(tmp_path / "b.json", {"a": 1}),
            save_npy(tmp_path / "c.npy", np.zeros(2)),
        ]
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path}: {oct(path.stat().st_mode)}"


@pytest.mark.parametrize("damage", ['{"cam": {"miou": 5', "[1, 2]", "\xff\xfe"])
def test_update_results_moves_a_damaged_file_aside_and_keeps_the_new_figure(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "results.json"
    path.write_bytes(damage.encode("latin-1"))
    with pytest.warns(
        UserWarning, match=r"results\.json is damaged.*moved it aside to .*results\.json\.damaged-"
    ):
        merged = update_results(path, {"rw": {"miou": 60.0}})
    assert merged == {"rw": {"miou": 60.0}} == json.loads(path.read_text())
    (aside,) = tmp_path.glob("results.json.damaged-*")
    assert aside.read_bytes() == damage.encode("latin-1")  # the damaged file is kept for the user


def _report(tmp_path: Path) -> None:
    from pipeline_helpers import require_voc_sample, run_cli

    run_cli(["--voc-root", require_voc_sample(), "--workdir", tmp_path, "--stages", "report"])


def test_report_on_a_damaged_results_json_moves_it_aside_and_rebuilds_it(tmp_path: Path) -> None:
    (tmp_path / "eval_seg").mkdir()
    (tmp_path / "eval_seg" / "result_seg.json").write_text(
        json.dumps({"miou": 61.5, "split": "val", "images": 3})
    )
    for damage in ('{"cam": {"miou": 5', "[]"):
        (tmp_path / "results.json").write_text(damage)
        with pytest.warns(UserWarning, match=r"results\.json is damaged.*moved it aside to .*damaged-"):
            _report(tmp_path)
        assert json.loads((tmp_path / "results.json").read_text())["seg"]["miou"] == 61.5
        assert "| DeepLabV2 val | 61.50 |" in (tmp_path / "results.md").read_text()
    assert len(list(tmp_path.glob("results.json.damaged-*"))) == 2


def test_report_names_a_damaged_entry_and_keeps_the_others(tmp_path: Path) -> None:
    results = {"cam": {"threshold": 0.2}, "rw": 7, "seg": {"miou": 61.5, "split": "val", "images": 3}}
    (tmp_path / "results.json").write_text(json.dumps({**results, "cam_baseline": "x"}))
    _report(tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "damaged entry 'cam' in results.json" in text and "damaged entry 'rw'" in text
    assert "| 61.50 | val (3 images)" in text
