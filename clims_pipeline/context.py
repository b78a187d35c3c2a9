"""The stage framework: the :class:`Stage` base class, the stage registry and the context every stage gets.

A stage is inputs -> work -> outputs. It is one class in a module under ``stages/``::

    @register_stage
    class TrainRW(Stage):
        name, order, help = "train_rw", 50, "train AffinityNet on CAM-derived affinity labels"

        reads = ("make_cam",)  # earlier outputs it needs (the base class's preflight checks them)

        def check(self, ctx: StageContext) -> None:  # its own input checks, before any stage runs
            ...

        def run(self, ctx: StageContext) -> None:  # the work: read inputs, write outputs
            output = ctx.output(self.name, self.output_directory(ctx), fingerprint)
            ...

plus an import line in ``stages/__init__.py``. Stages run in ``order``. A stage reads earlier stages' outputs
only through the modules below ``stages/`` (``cams``, ``label_maps``, ``clip_setup``, ``training``) and the
run-state protocol of ``runstate`` (is an output current, resume, sharding); stage modules never import each
other. The run is described by ``ctx.config`` alone (see ``config.PipelineConfig``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from .config import PipelineConfig
from .crf import require_densecrf
from .data import Problem, SegmentationSource, build_source, check_split, raise_problems
from .distributed import DistributedInfo, all_gather_objects, barrier
from .files import update_results, write_result_files
from .runstate import StageOutput, read_manifest


class Stage:
    """One step of the pipeline: inputs -> work -> outputs.

    Subclasses set ``name``, ``order``, ``help`` and ``reads`` (the earlier stages whose outputs they read)
    and override the hooks: ``check`` (their own input checks), ``run`` (the work) and, where the output is
    not ``<workdir>/<name>``, ``output_directory``. The base class owns the preflight: every input named by
    ``inputs`` must be a complete output already, or come from a stage selected in this run.
    """

    name: ClassVar[str]
    order: ClassVar[float]
    help: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()

    def inputs(self, ctx: StageContext) -> tuple[str, ...]:
        """The stages whose outputs this run of the stage reads (``reads`` unless it depends on settings)."""
        return self.reads

    def output_directory(self, ctx: StageContext) -> Path:
        """Where the stage's output and its manifest live."""
        return ctx.workdir / self.name

    def check(self, ctx: StageContext) -> None:
        """The stage's own input checks (data lists, files)."""

    def uses_crf(self, ctx: StageContext) -> bool:
        """Whether this run of the stage needs the dense CRF (the ``crf`` extra)."""
        return False

    def in_all(self, config: PipelineConfig) -> bool:
        """Whether ``--stages all`` runs this stage under ``config`` (e.g. only the chosen refiner); a stage
        named in ``--stages`` runs regardless."""
        return True

    def preflight(self, ctx: StageContext) -> None:
        """Runs for every selected stage before the first one starts, so that a broken data set, a missing
        input or a missing optional dependency stops the pipeline before any training."""
        self.check(ctx)
        if self.uses_crf(ctx):
            require_densecrf()
        for producer in self.inputs(ctx):
            if producer in ctx.requested_stages:
                continue
            directory = STAGES[producer].output_directory(ctx)
            manifest = read_manifest(directory)
            if manifest is None or not manifest.get("complete"):
                raise FileNotFoundError(
                    f"{self.name} reads the output of {producer} in {directory}, which is missing or "
                    f"unfinished: run stage {producer} first (e.g. --stages {producer},{self.name})"
                )

    def run(self, ctx: StageContext) -> None:
        """Read the inputs, do the work, write the outputs (reusing current ones)."""
        raise NotImplementedError(f"stage {self.name!r} does not define run()")


STAGES: dict[str, Stage] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage known to the command line."""
    for attribute in ("name", "order", "help"):
        if not hasattr(cls, attribute):
            raise TypeError(f"stage class {cls.__name__} must set {attribute!r}")
    if cls.name in STAGES:
        raise ValueError(f"stage {cls.name!r} is registered twice")
    STAGES[cls.name] = cls()
    return cls


def ordered_stages(names: list[str]) -> list[Stage]:
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ValueError(
            f"unknown stage(s) {unknown}; known stages: {sorted(STAGES, key=lambda n: STAGES[n].order)}"
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
    """What every stage gets: the run's config, work directory, device and ranks."""

    config: PipelineConfig
    workdir: Path
    device: torch.device
    dist: DistributedInfo
    force: bool = False
    requested_stages: list[str] = field(default_factory=list)
    _loggers: dict[str, RunLogger] = field(default_factory=dict)
    _validated: dict[tuple[str, bool, bool], list[str]] = field(default_factory=dict)
    _collected: list[Problem] | None = None
    _labelled: set[str] = field(default_factory=set)  # splits whose labels this run derived or read

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def amp(self) -> bool:
        return self.config.amp

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
            self.config.dataset, self.config.data.root, self.cache_dir, self.config.data.classes
        )

    @property
    def problems_file(self) -> Path:
        return self.workdir / "preflight" / "problems.txt"

    def validate_split(self, split: str, need_masks: bool = False, need_labels: bool = False) -> list[str]:
        """The ids of a split after reading its list, every image and its masks or label sources (see
        ``clims_pipeline.data.check_split``); each check runs once per pipeline run, shared over the ranks,
        and a passed image is not read again while its files are unchanged. Between
        :meth:`begin_preflight` and :meth:`end_preflight` the problems are collected (and reported
        together) instead of raised.
        Collective under ``torchrun``: every rank calls it."""
        key = (split, need_masks, need_labels)
        if key not in self._validated:
            image_ids, problems = check_split(
                self.source,
                split,
                need_masks,
                need_labels,
                cache_dir=self.cache_dir,
                force=self.force,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                gather=all_gather_objects,
                say=self.print,
            )
            if self._collected is not None:
                self._collected += problems
            else:
                raise_problems(problems, self.problems_file if self.dist.is_main else None)
            self._validated[key] = image_ids
        return self._validated[key]

    def begin_preflight(self) -> None:
        """Collect data problems from here on (the stages' preflights), to report them all at once."""
        self._collected = []

    def end_preflight(self, also: BaseException | None = None) -> None:
        """Raise one error with every problem collected since :meth:`begin_preflight` (grouped by kind,
        the full list in ``<workdir>/preflight/problems.txt``)."""
        problems, self._collected = self._collected or [], None
        # The same split can be checked for images and for masks: report a problem once.
        unique = list(dict.fromkeys(problems))
        raise_problems(unique, self.problems_file if self.dist.is_main else None, also=also)

    def labels(self, split: str) -> dict[str, list[int]]:
        """Image-level labels of a split; the main rank derives and caches them, the others read the cache."""
        if self.dist.is_main:
            force = self.force and split not in self._labelled  # --force: derived again once per run
            labels = self.source.labels(split, self.cache_dir, force=force)
            self._labelled.add(split)
        barrier()
        if not self.dist.is_main:
            labels = self.source.labels(split, self.cache_dir)
        return labels

    def output(self, stage: str, directory: Path, fingerprint: dict[str, Any]) -> StageOutput:
        """A stage output under the run-state protocol (see ``runstate``)."""
        return StageOutput(stage, directory, fingerprint, self.dist, self.print, force=self.force)

    def logger(self, stage: str) -> RunLogger:
        if stage not in self._loggers:
            self._loggers[stage] = RunLogger(
                self.workdir / "logs" / f"{stage}.jsonl",
                self.workdir / "tensorboard" / stage,
                enabled=self.dist.is_main,
            )
        return self._loggers[stage]

    def update_results(self, updates: dict[str, Any], stage: str | None = None) -> None:
        """Merge ``updates`` into ``results.json`` (main rank). With ``stage`` each entry is first written to
        ``<workdir>/<stage>/result_<key>.json`` too: what a damaged ``results.json`` is rebuilt from."""
        if self.dist.is_main:
            if stage is not None:
                write_result_files(self.stage_dir(stage), updates)
            update_results(self.results_path, updates)

    def print(self, *parts: Any) -> None:
        if self.dist.is_main:
            print(*parts, flush=True)

    def close(self) -> None:
        for logger in self._loggers.values():
            logger.close()
