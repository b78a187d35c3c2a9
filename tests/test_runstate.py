"""The run-state protocol every stage follows: reuse a current output, recompute a stale one and say why,
resume unfinished per-image work, refuse to throw away an interrupted run made with other settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clims_pipeline.distributed import DistributedInfo
from clims_pipeline.files import DamagedFileError
from clims_pipeline.runstate import (
    StageOutput,
    changed_fields,
    digest,
    output_digest,
    read_manifest,
    verify_file,
)


def make_output(directory: Path, fingerprint: dict, said: list[str], force: bool = False) -> StageOutput:
    return StageOutput("demo", directory, fingerprint, DistributedInfo(), said.append, force=force)


def test_changed_fields_names_nested_and_missing_keys() -> None:
    old = {"train": {"lr": 0.1, "epochs": 3}, "seed": 0}
    new = {"train": {"lr": 0.2, "epochs": 3}, "seed": 0, "extra": 1}
    assert changed_fields(old, new) == ["extra", "train.lr"]
    assert changed_fields(old, old) == []
    assert digest({"a": (1, 2)}) == digest({"a": [1, 2]})  # tuples and lists fingerprint alike


def test_a_complete_output_with_the_same_fingerprint_is_reused(tmp_path: Path) -> None:
    said: list[str] = []
    output = make_output(tmp_path / "out", {"lr": 0.1}, said)
    assert not output.reuse()
    output.begin()
    (output.directory / "model.pt").write_text("weights")
    output.complete(steps=3)
    again = make_output(tmp_path / "out", {"lr": 0.1}, said)
    assert again.reuse(again.directory / "model.pt")
    assert said[-1].startswith("[demo] done already:") and "--force" in said[-1]
    assert read_manifest(tmp_path / "out") == {
        "stage": "demo",
        "fingerprint": {"lr": 0.1},
        "complete": True,
        "steps": 3,
    }
    assert not make_output(tmp_path / "out", {"lr": 0.1}, said, force=True).reuse()


def test_a_stale_output_is_recomputed_and_the_change_is_named(tmp_path: Path) -> None:
    said: list[str] = []
    first = make_output(tmp_path / "out", {"train": {"lr": 0.1}}, said)
    first.begin()
    (first.directory / "a.npy").write_text("old")
    nested = first.directory / "labels"  # an output of its own, with its own manifest: kept
    make_output(nested, {"x": 1}, said).begin()
    first.complete()
    second = make_output(tmp_path / "out", {"train": {"lr": 0.2}}, said)
    assert not second.reuse()
    second.begin()
    assert "[demo] recomputing" in said[-1] and "train.lr changed" in said[-1]
    assert not (second.directory / "a.npy").exists()
    assert (nested / "manifest.json").exists()
    assert read_manifest(second.directory)["complete"] is False  # type: ignore[index]


def test_an_interrupted_run_with_other_settings_is_refused_not_thrown_away(tmp_path: Path) -> None:
    said: list[str] = []
    first = make_output(tmp_path / "out", {"lr": 0.1}, said)
    first.begin(refuse_stale_partial=True)
    (first.directory / "checkpoint.pt").write_text("half a run")
    other = make_output(tmp_path / "out", {"lr": 0.5}, said)
    with pytest.raises(
        RuntimeError, match=r"unfinished demo run with other settings \(lr changed\).*--force"
    ):
        other.begin(refuse_stale_partial=True)
    assert (first.directory / "checkpoint.pt").exists()
    make_output(tmp_path / "out", {"lr": 0.5}, said, force=True).begin(refuse_stale_partial=True)
    assert not (first.directory / "checkpoint.pt").exists()


def test_per_image_outputs_resume_and_report_missing_files(tmp_path: Path) -> None:
    said: list[str] = []
    output = make_output(tmp_path / "out", {"scales": [1.0]}, said)
    output.begin()

    def path_of(image_id: str) -> Path:
        return output.directory / f"{image_id}.npy"

    path_of("a").write_text("done before a kill")
    todo = output.todo(["a", "b", "c"], path_of, "images")
    assert todo == ["b", "c"] and said[-1] == "[demo] 1 of 3 images done already"
    assert output.share(todo) == ["b", "c"]  # one process takes everything
    with pytest.raises(RuntimeError, match=r"demo: 2 output files missing after the run, e.g. .*b\.npy"):
        output.finish_files(["a", "b", "c"], path_of)
    for image_id in todo:
        path_of(image_id).write_text("new")
    output.finish_files(["a", "b", "c"], path_of)
    assert read_manifest(output.directory)["items"] == 3  # type: ignore[index]


def test_sharding_deals_every_nth_item_to_each_rank(tmp_path: Path) -> None:
    ranks = [
        StageOutput("demo", tmp_path, {}, DistributedInfo(rank=rank, world_size=3), print).share(
            list(range(8))
        )
        for rank in range(3)
    ]
    assert ranks == [[0, 3, 6], [1, 4, 7], [2, 5]]


def test_a_later_stage_reads_the_digest_of_a_complete_output_only(tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(FileNotFoundError, match=r"no complete output in .*out: run stage make_cam first"):
        output_digest(tmp_path / "out", "make_cam")
    output = make_output(tmp_path / "out", {"k": 1}, said)
    output.begin()
    with pytest.raises(FileNotFoundError, match="run stage make_cam first"):
        output_digest(tmp_path / "out", "make_cam")
    output.complete()
    assert output_digest(tmp_path / "out", "make_cam") == digest({"k": 1})


def test_a_resumed_output_keeps_the_hash_of_a_kept_file_so_its_damage_stays_caught(tmp_path: Path) -> None:
    """finish_files hashes only the files todo sent to be recomputed: a kept file damaged since it was
    written (same size) is not blessed by the next run; verify_file still names it."""
    output = make_output(tmp_path / "out", {}, [])
    output.begin()

    def path_of(image_id: str) -> Path:
        return output.directory / f"{image_id}.npy"

    for image_id in "ab":
        path_of(image_id).write_text(f"written {image_id}")
    output.finish_files(["a", "b"], path_of)
    path_of("a").write_text("written x")  # the same size, other bytes
    path_of("b").unlink()
    again = make_output(tmp_path / "out", {}, [])
    again.begin()
    assert again.todo(["a", "b"], path_of) == ["b"]  # skipping goes by size
    path_of("b").write_text("written b")
    again.finish_files(["a", "b"], path_of)
    verify_file(path_of("b"))
    with pytest.raises(DamagedFileError, match=re.escape(f"{path_of('a')} is damaged: its sha256 is ")):
        verify_file(path_of("a"))
