"""The preflight reads every image and mask once before any training, reports every problem together
(grouped, the full list in <workdir>/preflight/problems.txt) and caches what passed by size + mtime."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import make_mini_voc, run_cli, run_subprocess

from clims_pipeline.data import DatasetError


def _ids(root: Path, split: str = "train") -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _mask(root: Path, image_id: str) -> Path:
    return root / "SegmentationClass" / f"{image_id}.png"


def _paint(path: Path, value: int) -> None:
    """Rewrite a palette mask with ``value`` in its top-left corner (the palette is kept)."""
    mask = Image.open(path)
    array = np.array(mask)
    array[:4, :4] = value
    edited = Image.fromarray(array, mode="P")
    edited.putpalette(mask.getpalette() or [])
    edited.save(path)


def _smoke(root: Path, workdir: Path, stages: str = "train_cam,make_cam,eval_cam", *extra: str) -> int:
    return run_cli(["--voc-root", root, "--workdir", workdir, "--stages", stages, "--preset=smoke", *extra])


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_mini_voc(tmp_path / "voc", train=8, val=2)


def test_out_of_range_mask_value_stops_before_training(voc: Path, tmp_path: Path) -> None:
    bad = _mask(voc, _ids(voc)[2])
    _paint(bad, 37)
    workdir = tmp_path / "w"
    list_file = voc / "ImageSets" / "Segmentation" / "train.txt"
    expected = (
        f"mask {bad} holds value 37 (16 pixels); expected 0..20 (background and the 20 classes) or void 255 "
        f"(listed in {list_file})"
    )
    with pytest.raises(DatasetError, match=re.escape(expected)):
        _smoke(voc, workdir)
    assert not (workdir / "train_cam").exists()
    assert expected in (workdir / "preflight" / "problems.txt").read_text()


def test_mask_of_another_size_and_truncated_image_are_reported_together(voc: Path, tmp_path: Path) -> None:
    ids = _ids(voc)
    small = _mask(voc, ids[0])
    mask = Image.open(small)
    width, height = mask.size
    mask.resize((width // 2, height // 2), Image.Resampling.NEAREST).save(small)
    truncated = voc / "JPEGImages" / f"{ids[1]}.jpg"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) * 6 // 10])  # the header still opens: only decoding fails
    with pytest.raises(DatasetError) as raised:
        _smoke(voc, tmp_path / "w")
    message = str(raised.value)
    assert "2 problem(s)" in message and "nothing was trained" in message
    assert (
        f"mask size differs from image: 1\n  - mask {small} is {width // 2}x{height // 2} but its image is "
        in message
    )
    assert f"unreadable image: 1\n  - unreadable image: {truncated} (image file is truncated" in message
    assert not (tmp_path / "w" / "train_cam").exists()


def test_duplicate_ids_in_a_list_are_reported(voc: Path, tmp_path: Path) -> None:
    list_file = voc / "ImageSets" / "Segmentation" / "train.txt"
    ids = _ids(voc)
    list_file.write_text("\n".join([*ids, ids[3]]) + "\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"id '{ids[3]}' is listed 2 times in {list_file} (entries 4, 9)")
    ):
        _smoke(voc, tmp_path / "w")


def test_many_problems_are_grouped_with_counts_and_the_full_list_in_a_file(tmp_path: Path) -> None:
    voc = make_mini_voc(tmp_path / "voc", train=14, val=1)
    bad = [_mask(voc, image_id) for image_id in _ids(voc)[:12]]
    for path in bad:
        _paint(path, 200)
    workdir = tmp_path / "w"
    with pytest.raises(DatasetError) as raised:
        _smoke(voc, workdir)
    message = str(raised.value)
    assert "mask value out of range: 12\n" in message and "... and 2 more" in message
    assert sum(str(path) in message for path in bad) == 10
    full = (workdir / "preflight" / "problems.txt").read_text()
    assert all(str(path) in full for path in bad)
    assert f"the full list is in {workdir / 'preflight' / 'problems.txt'}" in message


def test_second_preflight_reads_nothing_and_an_edited_mask_is_read_again(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "w"
    stages = "eval_cam"  # its preflight checks the val masks; the missing make_cam output stops it after that
    with pytest.raises(FileNotFoundError, match="run stage make_cam first"):
        _smoke(voc, workdir, stages, "--eval-split", "train")
    assert "8 read, 0 unchanged" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="run stage make_cam first"):
        _smoke(voc, workdir, stages, "--eval-split", "train")
    assert "0 read, 8 unchanged" in capsys.readouterr().out
    edited = _mask(voc, _ids(voc)[5])
    before = edited.stat()
    _paint(edited, 99)
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    with pytest.raises(DatasetError, match=re.escape(f"mask {edited} holds value 99")):
        _smoke(voc, workdir, stages, "--eval-split", "train")
    assert "1 read, 7 unchanged" in capsys.readouterr().out


def test_preflight_is_shared_over_torchrun_ranks(voc: Path, tmp_path: Path) -> None:
    ids = _ids(voc)
    bad = [_mask(voc, ids[0]), _mask(voc, ids[1])]  # one in each rank's share
    for path in bad:
        _paint(path, 40)
    result = run_subprocess(
        ["--voc-root", voc, "--workdir", tmp_path / "w", "--stages", "train_cam", "--preset=smoke"], nproc=2
    )
    assert result.returncode != 0
    assert "8 read, 0 unchanged since a passed check, 2 problems" in result.stdout
    assert "over 2 process(es)" in result.stdout
    for path in bad:
        assert f"mask {path} holds value 40" in result.stderr
    assert not (tmp_path / "w" / "train_cam").exists()
