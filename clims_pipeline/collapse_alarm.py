"""``train_clims``'s collapse alarm: per-class activation logged while training, a warning when a class dies.

The rule is ``clims_loss.detect_collapse`` (the one definition; docs/readiness.md). Here:

* the maps are the CLIMS network's training maps ``sigmoid(W^T Z)`` of every batch, as the loss sees them;
* the **reference** is the baseline CAM network (``train_cam``'s weights, the CLIMS network's starting
  point) read out the same way, computed once before training on up to
  ``train_clims.collapse_alarm.reference_images`` training crops per class (epoch-0 augmentation);
* the rule is checked **after every step** on the activation summed over the last ``log_every`` steps (all
  processes), so a class whose maps die at step ``s`` is reported by step ``s + log_every - 1`` at the
  latest (as soon as batches containing it have been seen since), naming the class, the step and the
  value. A class is reported once, and again only after it has recovered;
* every ``log_every`` steps (and at the last) the per-class means over the steps since the last log go to
  ``logs/train_clims.jsonl`` (event ``class_activation``; NaN as null where no batch had the class).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import clims_loss as cl

from .config import CollapseAlarmConfig
from .context import RunLogger
from .distributed import all_reduce_sum


def check_alarm_settings(config: CollapseAlarmConfig) -> None:
    """Raise naming the setting when a value is outside its range (before any training)."""
    for name in ("fraction", "flood_level"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"train_clims.collapse_alarm.{name}: expected a number in [0, 1], got {value!r}")
    if isinstance(config.reference_images, bool) or config.reference_images < 1:
        raise ValueError(
            "train_clims.collapse_alarm.reference_images: expected an integer >= 1, "
            f"got {config.reference_images!r}"
        )


def reference_indices(labels: Sequence[Any], per_class: int) -> list[int]:
    """Up to ``per_class`` dataset indices per class (the first images containing it), each index once."""
    chosen: dict[int, None] = {}
    counts: dict[int, int] = {}
    for index, label in enumerate(labels):
        for k in torch.as_tensor(label).nonzero().flatten().tolist():
            if counts.get(k, 0) < per_class:
                counts[k] = counts.get(k, 0) + 1
                chosen[index] = None
    return list(chosen)


@torch.no_grad()
def baseline_activation(
    network: nn.Module,
    dataset: Dataset[dict[str, Any]],
    keys: Sequence[Any],
    num_classes: int,
    batch_size: int,
    device: torch.device,
) -> cl.ClassActivation:
    """The per-class activation of ``network``'s forward maps (``(B, K, h, w)`` in ``[0, 1]``) on the samples
    ``dataset[key]`` (``{"image", "label"}``, loaded a batch at a time), summed over every process."""
    was_training = network.training
    network.eval()
    total = cl.ClassActivation.zeros(num_classes, device)
    for start in range(0, len(keys), batch_size):
        chunk = [dataset[key] for key in keys[start : start + batch_size]]
        images = torch.stack([sample["image"] for sample in chunk]).to(device)
        labels = torch.stack([sample["label"] for sample in chunk]).to(device)
        total = total + cl.class_activation(network(images).float(), labels, validate=False)
    network.train(was_training)
    return cl.ClassActivation.from_tensor(all_reduce_sum(total.as_tensor()))


class CollapseAlarm:
    """Feed it every step's maps (``observe``, inside the loss) and call ``after_step`` after every step."""

    def __init__(
        self,
        class_names: Sequence[str],
        reference: cl.ClassActivation,
        config: CollapseAlarmConfig,
        window: int,
        logger: RunLogger,
        say: Callable[[str], None],
        stage: str = "train_clims",
    ):
        self.class_names = tuple(class_names)
        self.reference = reference
        self.config = config
        self.window = window
        self.logger = logger
        self.say = say
        self.stage = stage
        self.recent: deque[tuple[int, torch.Tensor]] = deque(maxlen=window)
        self.current: torch.Tensor | None = None
        self.alarmed: set[int] = set()
        self.events: list[dict[str, Any]] = []

    def observe(self, maps: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch's ``(B, K, h, w)`` maps in ``[0, 1]`` (no sync)."""
        step = cl.class_activation(maps.detach(), labels, validate=False).as_tensor()
        self.current = step if self.current is None else self.current + step

    def after_step(self, step: int, total_steps: int) -> None:
        """Check the rule over the last ``window`` steps; log the means when a log line is due."""
        current = self.current if self.current is not None else torch.zeros(4, len(self.class_names))
        self.current = None
        self.recent.append((step, all_reduce_sum(current.to(torch.float64))))
        window_sum = cl.ClassActivation.from_tensor(sum((t.cpu() for _, t in self.recent), torch.zeros(())))
        check = cl.detect_collapse(
            window_sum, self.reference, fraction=self.config.fraction, flood_level=self.config.flood_level
        )
        first_step = self.recent[0][0]
        collapsed = check.collapsed.tolist()
        for k, name in enumerate(self.class_names):
            if not collapsed[k]:
                self.alarmed.discard(k)
                continue
            if k in self.alarmed:
                continue
            self.alarmed.add(k)
            for message in check.messages(self.class_names, classes=[k]):
                self.say(f"[{self.stage}] WARNING step {step}: {message} (steps {first_step}-{step})")
            event = {
                "class": name,
                "vanished": bool(check.vanished[k]),
                "flooded": bool(check.flooded[k]),
                "positive_mean": _finite(check.positive_mean[k]),
                "negative_mean": _finite(check.negative_mean[k]),
                "reference": _finite(check.reference[k]),
                "reference_negative": _finite(check.reference_negative[k]),
            }
            self.events.append({"step": step, **event})
            self.logger.log("collapse", step=step, **event)
        if step % self.window == 0 or step == total_steps:
            since = (step - 1) % self.window + 1  # the steps since the last log line
            logged = cl.ClassActivation.from_tensor(
                sum((t.cpu() for _, t in list(self.recent)[-since:]), torch.zeros(()))
            )
            self.logger.log(
                "class_activation",
                step=step,
                positive={n: _finite(v) for n, v in zip(self.class_names, logged.positive_mean, strict=True)},
                negative={n: _finite(v) for n, v in zip(self.class_names, logged.negative_mean, strict=True)},
            )
        if step == total_steps and self.alarmed:
            names = [self.class_names[k] for k in sorted(self.alarmed)]
            self.say(
                f"[{self.stage}] WARNING: collapsed at the last step: {', '.join(names)} (docs/readiness.md)"
            )


def _finite(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if math.isnan(number) else round(number, 6)
