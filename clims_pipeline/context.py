"""The stage framework: a registry of stage functions and the context object every stage receives.

Adding a stage is one decorated function in a module under ``stages/``::

    @register_stage("train_rw", order=50, help="train AffinityNet on CAM-derived affinity labels")
    def train_rw(ctx: StageContext) -> None:
        out_dir = ctx.stage_dir("train_rw")
        ...
        ctx.update_results({"rw": {"miou": ...}})

plus an import line in ``stages/__init__.py``. Stages run in ``order``; each one reads what earlier stages
left in
the work directory and must be safe to rerun (skip finished work, resume unfinished work).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .config import PipelineConfig
from .data import SegmentationSource, build_source
from .distributed import DistributedInfo, barrier
from .files import update_results


@dataclass(frozen=True)
class Stage:
    name: str
    order: float
    help: str
    run: Callable[[StageContext], None]
    #: Checks the stage's inputs (e.g. ``ctx.validate_split(...)``); the preflights of all selected stages run
    #: before the first stage starts, so a broken dataset stops the pipeline before any training.
    preflight: Callable[[StageContext], None] | None = None


STAGES: dict[str, Stage] = {}


def register_stage(
    name: str, order: float, help: str, preflight: Callable[[StageContext], None] | None = None
) -> Callable[[Callable[[StageContext], None]], Callable[[StageContext], None]]:
    def decorator(function: Callable[[StageContext], None]) -> Callable[[StageContext], None]:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        STAGES[name] = Stage(name=name, order=order, help=help, run=function, preflight=preflight)
        return function

    return decorator


def ordered_stages(names: list[str]) -> list[Stage]:
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ValueError(
            f"unknown stage(s) {unknown}; known stages: {list(sorted(STAGES, key=lambda n: STAGES[n].order))}"
        )
    return sorted((STAGES[name] for name in dict.fromkeys(names)), key=lambda stage: stage.order)


class RunLogger:
    """JSON lines (``<workdir>/logs/<stage>.jsonl``), plus TensorBoard scalars when it is installed.

    Only the main rank writes; other ranks get a logger that drops everything.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None, enabled: bool):
        self.path = path
        self.enabled = enabled
        self._writer: Any = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(tensorboard_dir))
                except ImportError:  # optional: JSONL is the record of truth
                    self._writer = None

    def log(self, event: str, step: int | None = None, **values: Any) -> None:
        if not self.enabled:
            return
        record = {
            "time": round(time.time(), 3),
            "event": event,
            **({"step": step} if step is not None else {}),
            **values,
        }
        # One short line per write with O_APPEND: a killed run can at worst lose its last line.
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._writer is not None and step is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{event}/{key}", value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass
class StageContext:
    """What every stage gets: parsed arguments, resolved config, work directory, device and ranks."""

    args: argparse.Namespace
    config: PipelineConfig
    workdir: Path
    device: torch.device
    dist: DistributedInfo
    seed: int = 0
    amp: bool = False
    force: bool = False
    requested_stages: list[str] = field(default_factory=list)
    _loggers: dict[str, RunLogger] = field(default_factory=dict)
    _validated: dict[tuple[str, bool, bool], list[str]] = field(default_factory=dict)

    @property
    def results_path(self) -> Path:
        return self.workdir / "results.json"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    def stage_dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def source(self) -> SegmentationSource:
        return build_source(
            self.config.dataset,
            getattr(self.args, "voc_root", None),
            getattr(self.args, "coco_root", None),
            self.cache_dir,
        )

    def validate_split(self, split: str, need_masks: bool = False, need_labels: bool = False) -> list[str]:
        """The ids of a split after checking its list, images and masks or label sources (see
        ``SegmentationSource.validate``); each check runs once per pipeline run."""
        key = (split, need_masks, need_labels)
        if key not in self._validated:
            self._validated[key] = self.source.validate(split, need_masks=need_masks, need_labels=need_labels)
        return self._validated[key]

    def labels(self, split: str) -> dict[str, list[int]]:
        """Image-level labels of a split; the main rank derives and caches them, the others read the cache."""
        if self.dist.is_main:
            labels = self.source.labels(split, self.cache_dir)
        barrier()
        if not self.dist.is_main:
            labels = self.source.labels(split, self.cache_dir)
        return labels

    def logger(self, stage: str) -> RunLogger:
        if stage not in self._loggers:
            self._loggers[stage] = RunLogger(
                self.workdir / "logs" / f"{stage}.jsonl",
                self.workdir / "tensorboard" / stage,
                enabled=self.dist.is_main,
            )
        return self._loggers[stage]

    def update_results(self, updates: dict[str, Any]) -> None:
        if self.dist.is_main:
            update_results(self.results_path, updates)

    def print(self, *parts: Any) -> None:
        if self.dist.is_main:
            print(*parts, flush=True)

    def close(self) -> None:
        for logger in self._loggers.values():
            logger.close()
