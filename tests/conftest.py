"""Shared fixtures: tiny, randomly initialised open_clip models (offline, CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

TINY_CONTEXT = 16
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": TINY_CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_NAME = "clims-test-tiny"


def make_tiny_clip(seed: int = 0, quick_gelu: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=TINY_CONFIG["embed_dim"],
        vision_cfg=TINY_CONFIG["vision_cfg"],
        text_cfg=TINY_CONFIG["text_cfg"],
        quick_gelu=quick_gelu,
    )
    return model.eval()


def tiny_tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer(context_length=TINY_CONTEXT)


@pytest.fixture(scope="module")
def tiny_config_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register the tiny architecture with open_clip so that ``create_model(name)`` knows it."""
    path = Path(tmp_path_factory.mktemp("open_clip_cfg")) / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_NAME


@pytest.fixture
def tiny_clip() -> torch.nn.Module:
    return make_tiny_clip()


@pytest.fixture
def tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return tiny_tokenizer()
