"""The training loop shared by ``train_cam`` and ``train_clims`` (and later trainers).

It handles what every trainer needs: DistributedDataParallel over ``torchrun`` ranks with a DistributedSampler
(the configured batch is the *global* batch), SGD or AdamW with per-step poly / cosine learning rates and a
10x head, mixed precision, tqdm progress, JSONL logs, a checkpoint at the end of every epoch and resuming
from it.

Resuming reproduces an uninterrupted run exactly: the data order is a function of ``(seed, epoch)`` and each
sample's augmentation a function of ``(seed, epoch, index)``, so nothing depends on RNG state carried over
time.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .config import TrainConfig
from .context import Stage, StageContext
from .data import EpochIndexSampler, TrainCropDataset
from .distributed import all_reduce_sum, barrier, kill_if_test_step
from .files import DamagedFileError, load_torch_file, save_torch
from .networks import CAMNet
from .runstate import StageOutput, output_digest, verify_file

#: loss_fn(model, batch) -> (scalar loss, {name: scalar tensor} for logging)
LossFunction = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
#: after_step(step, total_steps): called on every process after each optimisation step (``step`` 1-based)
StepHook = Callable[[int, int], None]


def learning_rate_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    progress = min(step / max(total_steps, 1), 1.0)
    if config.schedule == "poly":
        return float((1.0 - progress) ** config.poly_power)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"expected schedule 'poly' or 'cosine', got {config.schedule!r}")


def plan_steps(num_images: int, config: TrainConfig, what: str = "") -> tuple[int, int]:
    """(steps per epoch, total steps) of ``config`` over ``num_images`` (ragged last batch dropped)."""
    steps_per_epoch = num_images // config.batch_size
    if steps_per_epoch == 0:
        prefix = f"{what}: " if what else ""
        raise ValueError(
            f"{prefix}{num_images} training images are fewer than one batch of {config.batch_size}"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return steps_per_epoch, total_steps


OPTIMIZERS = ("sgd", "adamw")


def optimizer_with_head_group(
    model: CAMNet, config: TrainConfig
) -> tuple[torch.optim.Optimizer, list[float]]:
    """``config.optimizer`` over the backbone and the head (``head_lr_mult`` x lr) groups; returns it and
    the base lrs (the schedule scales them every step)."""
    backbone, head = model.parameter_groups()
    base_lrs = [config.lr, config.lr * config.head_lr_mult]
    groups = [{"params": backbone, "lr": base_lrs[0]}, {"params": head, "lr": base_lrs[1]}]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    elif config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"expected optimizer one of {OPTIMIZERS}, got {config.optimizer!r}")
    return optimizer, base_lrs


@contextmanager
def small_op_threads(ctx: StageContext, tiny_network: bool) -> Iterator[None]:
    """One intra-op thread for per-image CPU inference of tiny networks, restored afterwards.

    Images differ in size, so every image pays the CPU kernels' per-shape set-up, and the random walk is many
    small operations: with threads this is spin-up overhead, not work (measured on a busy 2-core machine:
    pair affinities of one VOC image 2 s with 2 threads, 0.01 s with 1). Full-size networks keep all threads.
    """
    if ctx.device.type != "cpu" or not tiny_network:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ScheduledSteps:
    """The optimisation step every trainer here takes (the pipeline's ``train_network`` and the in-memory
    ablation trainer): each group's lr set from the schedule, the loss, a backward (through the grad scaler
    when there is one), the optimiser step, and a stop on a non-finite loss."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, base_lrs: list[float], config: TrainConfig, total_steps: int
    ):
        self.optimizer, self.base_lrs, self.config, self.total_steps = (
            optimizer,
            base_lrs,
            config,
            total_steps,
        )

    def step(
        self,
        step: int,
        compute_loss: Callable[[], tuple[torch.Tensor, dict[str, Any]]],
        scaler: torch.amp.GradScaler | None = None,
        what: str = "training",
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Take optimisation step ``step`` (0-based); return the loss and its logged parts."""
        factor = learning_rate_factor(self.config, step, self.total_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor
        loss, parts = compute_loss()
        self.optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            self.optimizer.step()
        else:
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(self.optimizer)
            scaler.update()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{what}: non-finite loss {loss.item()} at step {step + 1}")
        return loss, parts


class RunningSums:
    """Sums of the logged values since the last log line, due every ``log_every`` steps and at the end."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.sums: dict[str, float] = {}

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(
                value.detach() if torch.is_tensor(value) else value
            )

    def due(self, step: int, total_steps: int) -> int:
        """How many steps the sums cover when a log line is due after ``step`` (1-based); 0 otherwise."""
        if step % self.log_every == 0:
            return self.log_every
        return step % self.log_every if step == total_steps else 0

    def take(self) -> dict[str, float]:
        sums, self.sums = self.sums, {}
        return sums


def autocast_context(device: torch.device, enabled: bool) -> torch.autocast:
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def final_model_path(ctx: StageContext, stage: str) -> Path:
    return ctx.workdir / stage / "model.pt"


def load_final_model(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load a stage's ``model.pt`` into ``model``, after checking it against the size and sha256 its
    manifest recorded; return its metadata. A damaged file raises :class:`DamagedFileError` naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: run the stage that writes it first")
    stage = path.parent.name
    verify_file(path, stage)
    remedy = f"rerun stage {stage} with --force to rebuild it"
    payload = load_torch_file(path, remedy)
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise DamagedFileError(f"{path} holds no model (no 'state_dict'); {remedy}")
    model.load_state_dict(payload["state_dict"])
    meta: dict[str, Any] = payload.get("meta", {})
    return meta


def train_network(
    ctx: StageContext,
    output: StageOutput,
    model: CAMNet,
    dataset: Dataset[dict[str, Any]],
    config: TrainConfig,
    loss_fn: LossFunction,
    after_step: StepHook | None = None,
) -> Path:
    """Train ``model`` on ``dataset`` into ``output`` (``model.pt``); resume from its ``checkpoint.pt``.

    The caller has checked that the output is not current (``output.reuse``); a stale one is cleared here,
    after the caller has built (and so checked) the model and the data."""
    stage = output.stage
    final_path = output.directory / "model.pt"
    checkpoint_path = output.directory / "checkpoint.pt"
    output.begin(refuse_stale_partial=True)  # an interrupted run with other settings is kept (use --force)
    fingerprint = output.fingerprint

    world, rank = ctx.dist.world_size, ctx.dist.rank
    if config.batch_size % world:
        raise ValueError(
            f"{stage}: batch size {config.batch_size} (global) must divide evenly over {world} processes"
        )
    per_rank_batch = config.batch_size // world
    _, total_steps = plan_steps(len(dataset), config, stage)  # type: ignore[arg-type]  # map-style: sized

    # DistributedSampler with drop_last + a per-rank DataLoader with drop_last: rank r's k-th batch is
    # perm[k*B + r :: world][:B/world], so the ranks of one step together see exactly the global batch k.
    sampler = EpochIndexSampler(
        DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=ctx.seed, drop_last=True
        )
    )
    loader = DataLoader(
        dataset,
        batch_size=per_rank_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=ctx.config.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=ctx.config.data.num_workers > 0,
    )

    model.to(ctx.device)
    optimizer, base_lrs = optimizer_with_head_group(model, config)
    schedule = ScheduledSteps(optimizer, base_lrs, config, total_steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp and ctx.device.type == "cuda")

    # The number of processes is not part of the fingerprint: the global batches, and so the optimisation, do
    # not depend on it, so a run may resume on another number of GPUs.
    start_epoch, step, epoch_batches = 0, 0, 0
    if checkpoint_path.exists():
        checkpoint = load_torch_file(
            checkpoint_path,
            f"delete it to restart {stage} from its first step (or rerun with --force to start over)",
        )
        if checkpoint["fingerprint"] != fingerprint:
            raise RuntimeError(
                f"{checkpoint_path} was written with other settings ({checkpoint['fingerprint']}); "
                f"rerun with --force to start {stage} over"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        epoch_batches = int(checkpoint.get("epoch_batches", 0))  # global batches of start_epoch already done
        where = f", {epoch_batches} batches into it" if epoch_batches else ""
        ctx.print(f"[{stage}] resuming from {checkpoint_path} (epoch {start_epoch}, step {step}{where})")

    trained: nn.Module = model
    if world > 1:
        trained = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    logger = ctx.logger(stage)
    logger.log("start", step=step, total_steps=total_steps, global_batch=config.batch_size, world_size=world)

    def save_checkpoint(epoch: int, epoch_batches: int) -> None:
        if ctx.dist.is_main:
            save_torch(
                checkpoint_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "epoch_batches": epoch_batches,
                    "step": step,
                    "fingerprint": fingerprint,
                },
            )

    model.train()
    progress = tqdm(
        total=total_steps, initial=step, desc=stage, disable=not ctx.dist.is_main, dynamic_ncols=True
    )
    epoch = start_epoch
    with termination_requests() as terminate:
        while step < total_steps:
            # The order of an epoch is a function of (seed, epoch), so the batches already trained in it are
            # skipped by position (each rank skips its share of them: per-rank batch x batches).
            sampler.set_epoch(epoch, skip=epoch_batches * per_rank_batch)
            running = RunningSums(config.log_every)
            for batch in loader:
                if step >= total_steps:
                    break
                batch = {
                    key: value.to(ctx.device, non_blocking=True) if torch.is_tensor(value) else value
                    for key, value in batch.items()
                }

                def compute_loss(
                    batch: dict[str, Any] = batch,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                    with autocast_context(ctx.device, ctx.amp):
                        return loss_fn(trained, batch)

                loss, parts = schedule.step(step, compute_loss, scaler, stage)
                step += 1
                epoch_batches += 1
                progress.update(1)
                running.add({"loss": loss, **parts})
                if after_step is not None:
                    after_step(step, total_steps)
                count = running.due(step, total_steps)
                if count:
                    averaged = _average_over_ranks(running.take(), count, ctx.device)
                    logger.log(
                        "train", step=step, epoch=epoch, lr=optimizer.param_groups[0]["lr"], **averaged
                    )
                    progress.set_postfix(loss=f"{averaged['loss']:.4f}")
                kill_if_test_step(step)
                if terminate(ctx.device):
                    save_checkpoint(epoch, epoch_batches)
                    logger.log("terminated", step=step, epoch=epoch)
                    barrier()
                    ctx.print(f"[{stage}] SIGTERM: saved {checkpoint_path} at step {step}; rerun to resume")
                    raise SystemExit(128 + signal.SIGTERM)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                    save_checkpoint(epoch, epoch_batches)
            epoch += 1
            epoch_batches = 0
            save_checkpoint(epoch, 0)
            logger.log("epoch_end", step=step, epoch=epoch)
            barrier()
    progress.close()

    if ctx.dist.is_main:
        save_torch(final_path, {"state_dict": model.state_dict(), "meta": {**fingerprint, "steps": step}})
    # The manifest vouches for model.pt (size + sha256) before the checkpoint goes: a kill in between
    # leaves a finished output, never a model nothing can prove.
    output.complete(proofs=[final_path.name], steps=step)
    if ctx.dist.is_main:
        checkpoint_path.unlink(missing_ok=True)
    logger.log("done", step=step)
    barrier()
    ctx.print(f"[{stage}] wrote {final_path}")
    return final_path


@contextmanager
def termination_requests() -> Iterator[Callable[[torch.device], bool]]:
    """While training, SIGTERM (a cluster preempting the job) only sets a flag; the loop asks
    ``terminate(device)`` after each step, which is true on every rank once any rank got the signal, so that
    all ranks stop at the same step after a checkpoint. The previous handler is restored afterwards."""
    received = {"flag": False}

    def handler(signum: int, frame: Any) -> None:
        received["flag"] = True

    def terminate(device: torch.device) -> bool:
        if torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if received["flag"] else 0.0], device=device)
            return bool(all_reduce_sum(flag).item() > 0)
        return received["flag"]

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield terminate
        return
    try:
        yield terminate
    finally:
        signal.signal(signal.SIGTERM, previous)


def _average_over_ranks(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    keys = sorted(sums)
    totals = all_reduce_sum(torch.tensor([sums[key] for key in keys], dtype=torch.float64, device=device))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {key: float(total) / (count * world) for key, total in zip(keys, totals.tolist(), strict=True)}


def check_training_data(ctx: StageContext) -> None:
    ctx.validate_split(ctx.config.data.train_split, need_labels=True)


def data_fingerprint(ctx: StageContext) -> dict[str, Any]:
    """What the training crops depend on: the data set, its root, the split and the crop settings."""
    data = ctx.config.data
    return {
        "dataset": ctx.config.dataset,
        "source": ctx.source.fingerprint(),
        "train_split": data.train_split,
        "crop_size": data.crop_size,
        "resize_long": list(data.resize_long),
    }


class TrainerStage(Stage):
    """A stage that trains one network into ``<workdir>/<name>/model.pt`` with :func:`train_network`.

    The base class owns the flow (reuse a current model, build, train, resume); a trainer overrides the
    hooks: what its result depends on (``fingerprint``), its settings (``train_config``), its data, its
    network and its loss.
    """

    def train_config(self, ctx: StageContext) -> TrainConfig:
        raise NotImplementedError

    def fingerprint(self, ctx: StageContext) -> dict[str, Any]:
        """Everything the trained weights depend on besides ``train_config`` and the seed."""
        raise NotImplementedError

    def build_dataset(self, ctx: StageContext) -> Dataset[dict[str, Any]]:
        return build_train_dataset(ctx)

    def build_model(self, ctx: StageContext) -> nn.Module:
        raise NotImplementedError

    def loss_function(self, ctx: StageContext, model: nn.Module) -> LossFunction:
        raise NotImplementedError

    def after_step(self, ctx: StageContext) -> StepHook | None:
        """What to call after every step of this run (asked after ``loss_function``); None: nothing."""
        return None

    def output(self, ctx: StageContext) -> StageOutput:
        fingerprint = {
            "train": train_fingerprint(self.train_config(ctx)),
            "seed": ctx.seed,
            **self.fingerprint(ctx),
        }
        return ctx.output(self.name, ctx.workdir / self.name, fingerprint)

    def run(self, ctx: StageContext) -> None:
        output = self.output(ctx)
        if output.reuse(output.directory / "model.pt"):
            return
        dataset = self.build_dataset(ctx)
        model = self.build_model(ctx)
        loss_fn = self.loss_function(ctx, model)
        config, after_step = self.train_config(ctx), self.after_step(ctx)
        train_network(ctx, output, model, dataset, config, loss_fn, after_step)  # type: ignore[arg-type]


def train_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The settings the trained weights depend on: all but when checkpoints are written."""
    settings = asdict(config)
    del settings["checkpoint_every"]
    return settings


def model_digest(ctx: StageContext, stage: str) -> str:
    """The fingerprint digest of a stage's finished model (raises, naming the stage, when there is none)."""
    return output_digest(ctx.workdir / stage, stage)


def build_train_dataset(ctx: StageContext) -> TrainCropDataset:
    """Validate the training split (list, images, masks) and wrap it in the training augmentation."""
    split = ctx.config.data.train_split
    image_ids = ctx.validate_split(split, need_labels=True)
    labels = ctx.labels(split)
    return TrainCropDataset(
        ctx.source,
        image_ids,
        labels,
        resize_long=(int(ctx.config.data.resize_long[0]), int(ctx.config.data.resize_long[1])),
        crop_size=ctx.config.data.crop_size,
        seed=ctx.seed,
    )
