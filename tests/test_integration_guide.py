"""docs/integration.md: its listing is the example file and runs; its compile note holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_clip, tiny_tokenizer

import clims_loss as cl

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "integration.md").read_text(encoding="utf-8")


def _listing() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.split("## The whole loop", 1)[1], re.S)
    return str(blocks[0])


def test_page_is_plain_markdown_with_the_example_file_in_it() -> None:
    assert "--8<--" not in PAGE  # no docs-site include: the page reads the same on GitHub or in a terminal
    assert _listing() == (ROOT / "examples" / "integrate_resnet50.py").read_text(encoding="utf-8")


def test_page_listing_runs_offline(tmp_path: Path) -> None:
    script = tmp_path / "integrate_resnet50.py"
    script.write_text(_listing(), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script), "--tiny", "--steps", "1", "--batch-size", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"step 0: loss \d", result.stdout)


# ----------------------------------------------------------------------------- compile note
def _batch(pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 40, 36, generator=generator)
    cams = torch.rand(3, 20, 6, 5, generator=generator).requires_grad_()
    labels = torch.zeros(3, 20)
    labels.view(-1)[:pairs] = 1.0
    return images, cams, labels


def test_compile_equals_eager_and_recompiles_only_as_documented() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    compiled = torch.compile(evaluator, backend="eager")
    compilations = []
    for pairs in (2, 2, 3, 4, 7, 1, 0, 5, 1, 0):
        before = counters["frames"]["total"]
        images, cams, labels = _batch(pairs)
        out = compiled(images, cams, labels)
        (grad,) = torch.autograd.grad(out.loss, cams)
        reference = evaluator(images, cams, labels)
        (reference_grad,) = torch.autograd.grad(reference.loss, cams)
        torch.testing.assert_close(out.loss, reference.loss)
        torch.testing.assert_close(grad, reference_grad)
        compilations.append(counters["frames"]["total"] - before > 0)
    # first call; second call (first-call check done); N changes once (then dynamic); N = 1; N = 0.
    assert compilations == [True, True, True, False, False, True, True, False, False, False]
    torch._dynamo.reset()


@pytest.mark.parametrize("validate", [True, False])
def test_fullgraph_cannot_work_because_the_pair_count_is_data_dependent(validate: bool) -> None:
    torch._dynamo.reset()
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), validate=validate)
    with pytest.raises(Exception, match=r"tolist|data-dependent|Dynamic shape operator|nonzero"):
        torch.compile(evaluator, backend="eager", fullgraph=True)(*_batch(2))
    torch._dynamo.reset()
