"""clims_loss.data_parallel_loss: the mean of the ranks' gradients equals one process's gradient on the
whole batch, for every reduction the presets use (simulated ranks, the all-reduce a plain sum)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_clip, tiny_tokenizer

import clims_loss as cl


@pytest.mark.parametrize("preset", ["voc", "voc-camera-ready", "voc-official"])
def test_ranks_mean_gradient_equals_the_global_batch_gradient(preset: str) -> None:
    torch.manual_seed(0)
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), prompts=preset)
    images = torch.randn(4, 3, 48, 48)
    labels = torch.zeros(4, 20)
    labels[0, [3, 18]] = 1  # rank 0 holds 3 positive pairs, rank 1 holds 1: the pair counts differ
    labels[1, 8] = 1
    labels[2, 14] = 1
    cams = torch.rand(4, 20, 12, 12, requires_grad=True)

    whole = evaluator(images, cams, labels).loss
    (expected,) = torch.autograd.grad(whole, cams)

    outputs = [evaluator(images[s], cams[s], labels[s]) for s in (slice(0, 2), slice(2, 4))]
    total_pairs = sum(float(out.batch_index.numel()) for out in outputs)

    def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
        return torch.full_like(value, total_pairs)  # what a sum over the two ranks' pair counts gives

    ranks = [cl.data_parallel_loss(out, evaluator, 2, all_reduce_sum) for out in outputs]
    gradients = [torch.autograd.grad(loss, cams)[0] for loss in ranks]
    torch.testing.assert_close((gradients[0] + gradients[1]) / 2, expected, rtol=1e-5, atol=1e-7)


def test_one_process_is_the_plain_loss_and_world_size_is_checked() -> None:
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), prompts="voc")
    labels = torch.zeros(2, 20)
    labels[:, 3] = 1
    out = evaluator(torch.randn(2, 3, 48, 48), torch.rand(2, 20, 12, 12), labels)
    assert cl.data_parallel_loss(out, evaluator, 1) is out.loss
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"expected world_size to be an integer >= 1, got {bad!r}"):
            cl.data_parallel_loss(out, evaluator, bad)  # type: ignore[arg-type]
