"""The second toy world: deterministic, different in kind from the first, a data set the pipeline accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_toyworld import _file_bytes, one_torch_thread  # noqa: F401 (an autouse fixture: one torch thread)

from clims_pipeline.toy import clip as toy_clip
from clims_pipeline.toy import world as toyworld
from clims_pipeline.toy.plugin import ToySource
from clims_pipeline.toy.world_second import SECOND_CONTEXT_RATE

SMALL: dict[str, Any] = dict(
    n_train=40, n_val=8, n_background_only=6, n_background_only_val=6, image_size=64, progress=False
)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("worlds")
    for kind in ("first", "second"):
        toyworld.generate_toy_world(base / kind, seed=5, kind=kind, **SMALL)
    return {kind: base / kind for kind in ("first", "second")}


def _object_records(root: Path) -> list[dict[str, Any]]:
    return toyworld.read_captions(root, ["train_aug", "val"])


def test_second_world_is_deterministic_and_records_its_kind(worlds: dict[str, Path], tmp_path: Path) -> None:
    toyworld.generate_toy_world(tmp_path / "again", seed=5, kind="second", **SMALL)
    assert _file_bytes(tmp_path / "again") == _file_bytes(worlds["second"])
    metadata = toyworld.load_toy_world(worlds["second"])
    assert metadata["kind"] == metadata["config"]["kind"] == "second"
    assert metadata["config"]["context_rate"] == SECOND_CONTEXT_RATE
    assert toyworld.world_settings(worlds["second"]) == ("second", SECOND_CONTEXT_RATE)
    # Same seed, other kind: other pictures.
    first, second = _file_bytes(worlds["first"]), _file_bytes(worlds["second"])
    assert first["JPEGImages/train_000000.jpg"] != second["JPEGImages/train_000000.jpg"]


def test_second_world_differs_in_kind(worlds: dict[str, Path]) -> None:
    records = {kind: _object_records(root) for kind, root in worlds.items()}
    # One class per image, several times over (a herd, a flock), exists only in the second world.
    groups = [r for r in records["second"] if len(r["classes"]) == 1 and len(r["objects"]) > 1]
    assert groups, [r["objects"] for r in records["second"]]
    assert any(len(r["classes"]) > 1 for r in records["second"])

    def object_area(kind: str) -> float:
        """Mean share of the image one object covers (from the masks)."""
        areas = []
        for r in records[kind]:
            mask = np.asarray(Image.open(worlds[kind] / "SegmentationClass" / f"{r['id']}.png"))
            areas.append(float((mask > 0).mean()) / len(r["objects"]))
        return float(np.mean(areas))

    first, second = object_area("first"), object_area("second")
    assert second < 0.5 * first, (first, second)


@pytest.mark.parametrize(("rate", "images"), [(1.0, 40), (SECOND_CONTEXT_RATE, 150)])
def test_co_occurrence_rate_from_the_captions_matches_the_setting(
    tmp_path: Path, rate: float, images: int
) -> None:
    metadata = toyworld.generate_toy_world(
        tmp_path / "stats",
        n_train=images,
        n_val=0,
        n_background_only=0,
        n_background_only_val=0,
        kind="second",
        context_rate=None if rate == SECOND_CONTEXT_RATE else rate,
        progress=False,
    )
    assert metadata["config"]["context_rate"] == rate
    on_own = total = 0
    for record in toyworld.read_captions(tmp_path / "stats"):
        for class_name, context, _ in record["objects"]:
            on_own += context == toyworld.CLASS_BACKGROUND[class_name]
            total += 1
    measured = on_own / total
    if rate == 1.0:
        assert measured == 1.0
    else:
        assert abs(measured - rate) < 0.08, (measured, total)


def test_the_pipeline_preflight_accepts_the_second_world(worlds: dict[str, Path]) -> None:
    source = ToySource(worlds["second"])
    for split in ("train_aug", "train", "val"):
        assert source.validate(split, need_masks=True, need_labels=True)


def test_clip_corpus_draws_cutouts_from_the_worlds_own_kind(worlds: dict[str, Path]) -> None:
    corpus = toy_clip.toy_clip_corpus(worlds["second"], object_cutouts=2, extra_backgrounds=2)
    images = [np.asarray(image) for image, _ in corpus.samples[-4:]]
    cutouts, _ = toyworld.render_object_cutouts(2, kind="second")
    backgrounds, _ = toyworld.render_background_captions(2, kind="second")
    first_cutouts, _ = toyworld.render_object_cutouts(2, kind="first")
    np.testing.assert_array_equal(np.stack(images[:2]), cutouts)
    np.testing.assert_array_equal(np.stack(images[2:]), backgrounds)
    assert not np.array_equal(cutouts, first_cutouts)


def test_unknown_kind_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"toy world kind from \['first', 'second'\], got 'third'"):
        toyworld.generate_toy_world(tmp_path, kind="third", n_train=1, progress=False)


def test_a_world_written_before_kinds_is_reused_as_a_first_world(worlds: dict[str, Path]) -> None:
    path = worlds["first"] / "toyworld.json"
    metadata = json.loads(path.read_text())
    del metadata["config"]["kind"]
    metadata["generation_seconds"] = -1.0  # a marker: regeneration would overwrite it
    path.write_text(json.dumps(metadata))
    again = toyworld.generate_toy_world(worlds["first"], seed=5, **SMALL)
    assert again["generation_seconds"] == -1.0
    assert toyworld.world_settings(worlds["first"]) == ("first", 0.9)
