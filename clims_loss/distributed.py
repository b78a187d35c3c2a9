"""The evaluator's loss under DistributedDataParallel, equal to one process's loss on the global batch.

DDP averages the ranks' gradients. The ranks of one step hold different numbers of positive (image, class)
pairs, so averaging each rank's pair-averaged loss is not the loss of the whole global batch: a rank with 1
pair would weigh as much as a rank with 30. :func:`data_parallel_loss` rescales each term of Eq. 13 so that
the averaged gradient is exactly the single-process gradient on the global batch:

* a term averaged over a rank's pairs (OTM/BTM with ``pair_reduction="mean"``, a mean CBS, a REG over the
  positive maps only) is weighted by ``world_size * local_pairs / all_pairs``;
* a term summed over pairs (``"sum"``) is weighted by ``world_size``;
* REG over all ``B x K`` maps averages as many maps on every rank and needs nothing.

It costs one all-reduce of a scalar per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from clims_loss.evaluator import CLIPTextDrivenEvaluator, EvaluatorOutput


def _all_reduce_sum(value: Tensor) -> Tensor:
    torch.distributed.all_reduce(value)
    return value


def data_parallel_loss(
    out: EvaluatorOutput,
    evaluator: CLIPTextDrivenEvaluator,
    world_size: int,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """This rank's share of the global-batch loss (see the module docstring); ``out.loss`` for one process.

    Args:
        out: this rank's ``evaluator(images, cams, labels)``.
        evaluator: the evaluator that produced it (its registry's reductions and its weights are used).
        world_size: the number of DDP processes.
        all_reduce_sum: sums a tensor over the ranks in place and returns it; default
            ``torch.distributed.all_reduce`` (the process group must be initialised).
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"expected world_size to be an integer >= 1, got {world_size!r}")
    if world_size == 1:
        return out.loss
    reduce = _all_reduce_sum if all_reduce_sum is None else all_reduce_sum
    local_pairs = torch.tensor(float(out.batch_index.numel()), device=out.loss.device)
    all_pairs = reduce(local_pairs.clone()).clamp_min(1.0)
    mean_scale = local_pairs * world_size / all_pairs
    prompts, weights = evaluator.prompts, evaluator.weights

    def scale(reduction: str) -> Tensor | float:
        return mean_scale if reduction == "mean" else float(world_size)

    reg_scale = mean_scale if prompts.reg_positive_only else 1.0
    return (
        weights.otm * out.otm * scale(prompts.pair_reduction)
        + weights.btm * out.btm * scale(prompts.pair_reduction)
        + weights.cbs * out.cbs * scale(prompts.cbs_reduction)
        + weights.reg * out.reg * reg_scale
    )
