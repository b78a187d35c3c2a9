"""The preflight: every image and mask a run will read is read once, before any training.

For each split a stage needs, every image is decoded (not only its header), every mask is decoded and its
values checked against the data set's classes (``0..K``, ``255`` void) and its size against its image's, and
ids listed twice are found. Problems are not raised one at a time: the run collects all of them (over every
split and stage) and stops with one report, grouped by kind with counts and the first ten of each kind; the
full list goes to ``<workdir>/preflight/problems.txt``. Every message names the file, the value and the list.

A passed image is cached (``<workdir>/cache/preflight_<source>_<mode>.json``) by the one rule every cache of
the pipeline follows (:class:`clims_pipeline.files.StampedCache`: each file's size and mtime_ns, plus the
class list), so a second run only stats the files. Under ``torchrun`` rank ``r`` reads ``ids[r::world]``
and the problems are gathered, so no rank alone outlasts the process-group timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import (
    DatasetError,
    Problem,
    SegmentationSource,
    duplicate_problems,
    format_problems,
    raise_problems,
)
from .files import StampedCache

__all__ = ["Problem", "check_split", "format_problems", "raise_problems"]


def check_mode(need_masks: bool, need_labels: bool) -> str:
    return "masks" if need_masks else "labels" if need_labels else "images"


def cache_path(cache_dir: Path, source: SegmentationSource, need_masks: bool, need_labels: bool) -> Path:
    return cache_dir / f"preflight_{source.name}_{check_mode(need_masks, need_labels)}.json"


def check_split(
    source: SegmentationSource,
    split: str,
    need_masks: bool = False,
    need_labels: bool = False,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[list[str], list[Problem]]:
    """The ids of a split and every problem of its images and masks (or label sources); see the module.

    A missing or empty list raises :class:`DatasetError` at once (there is nothing else to check). With
    ``gather`` (``all_gather_objects``) every rank checks its share and every rank gets all problems.
    """
    started = time.perf_counter()
    image_ids = source.ids(split)
    list_file = source.list_file(split)
    if not image_ids:
        raise DatasetError(f"split {split!r} of {source.name} lists no images ({list_file})")
    problems = duplicate_problems(image_ids, list_file)
    cache = StampedCache(
        cache_path(cache_dir, source, need_masks, need_labels) if cache_dir is not None else None,
        source.class_names,
        context={"source": source.fingerprint(), "mode": check_mode(need_masks, need_labels)},
        force=force,
    )
    passed: dict[str, list[Any]] = {}
    found: list[Problem] = []
    read = 0
    for image_id in list(dict.fromkeys(image_ids))[rank::world_size]:
        stamps = cache.stamps(source.preflight_files(image_id, need_masks, need_labels))
        if cache.get(image_id, stamps) is True:
            continue
        read += 1
        item_problems = source.check_item(image_id, need_masks, need_labels)
        if item_problems:
            found += [(kind, f"{message} (listed in {list_file})") for kind, message in item_problems]
        else:
            passed[image_id] = stamps
    shares = gather((passed, found, read)) if gather is not None else [(passed, found, read)]
    read = 0
    for share_passed, share_found, share_read in shares:
        for image_id, stamps in share_passed.items():
            cache.put(image_id, stamps, True)
        problems += share_found
        read += share_read
    if rank == 0 and any(share[0] for share in shares):
        cache.save()
    if say is not None:
        unique = len(set(image_ids))
        say(
            f"[preflight] {list_file}: {len(image_ids)} ids ({check_mode(need_masks, need_labels)}), "
            f"{read} read, {unique - read} unchanged since a passed check, {len(problems)} problems, "
            f"{time.perf_counter() - started:.1f} s over {world_size} process(es)"
        )
    return image_ids, problems
