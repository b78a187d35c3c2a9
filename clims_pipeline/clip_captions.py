"""Caption sources for stage ``train_clip``: where the (image, caption) pairs a CLIP is trained on come from.

``train_clip.captions`` names one. ``labels`` is built in: the camera-ready paper's label captions
("a photo of boat and person.") from the training split's image labels. Plug-ins register their own
with :func:`register_caption_source`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .clip_training import Augment, label_caption_samples
from .context import StageContext


class CaptionCorpus(NamedTuple):
    samples: list[tuple[Any, str]]  # (image or its path, caption)
    maskable: list[bool] | None  # which samples the augmentation may mask (None: all)
    darken: list[bool] | None  # which samples it darkens (None: none)
    augment: Augment


CaptionSource = Callable[[StageContext], CaptionCorpus]
CAPTION_SOURCES: dict[str, CaptionSource] = {}


def register_caption_source(name: str, source: CaptionSource) -> None:
    if name in CAPTION_SOURCES:
        raise ValueError(f"caption source {name!r} is registered twice")
    CAPTION_SOURCES[name] = source


def caption_corpus(ctx: StageContext) -> CaptionCorpus:
    name = ctx.config.train_clip.captions
    if name not in CAPTION_SOURCES:
        raise ValueError(f"expected train_clip.captions to be one of {sorted(CAPTION_SOURCES)}, got {name!r}")
    return CAPTION_SOURCES[name](ctx)


def label_captions(ctx: StageContext) -> CaptionCorpus:
    root = ctx.source.root
    pairs: list[tuple[Any, str]] = [
        sample
        for split in ctx.config.train_clip.caption_splits
        for sample in label_caption_samples(root, split, ctx.source.class_names)
    ]
    return CaptionCorpus(pairs, None, None, Augment())


register_caption_source("labels", label_captions)
