"""Process-group set-up for ``torchrun`` and the few collective helpers the stages need.

A plain ``python`` run is a world of one process; every helper here is then a no-op, so stage code never needs
two code paths.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | None, local_rank: int) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present; ``"cuda"`` becomes ``cuda:<local_rank>``."""
    if requested in (None, "", "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested} was asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(requested_device: str | None) -> tuple[DistributedInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Inference shards can be uneven (e.g. one rank gets the large images), so be patient at barriers.
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(hours=2))
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank), device


#: Test hook: SIGKILL this process right after the given (1-based) optimisation step, to test resuming.
KILL_AT_STEP_ENV = "CLIMS_PIPELINE_TEST_KILL_AT_STEP"


#: Test hook: the signal :data:`KILL_AT_STEP_ENV` sends (``KILL`` unless set, e.g. ``TERM``).
KILL_SIGNAL_ENV = "CLIMS_PIPELINE_TEST_KILL_SIGNAL"


def kill_if_test_step(step: int) -> None:
    """Kill this process at the step :data:`KILL_AT_STEP_ENV` names (tests of resuming); no-op otherwise."""
    if step and step == int(os.environ.get(KILL_AT_STEP_ENV, "0")):
        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(KILL_SIGNAL_ENV, 'KILL')}"))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op in a single process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, source_rank: int = 0) -> Any:
    """Every rank gets rank ``source_rank``'s ``obj``."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=source_rank)
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
