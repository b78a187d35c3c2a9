"""The toy world's tiny CLIP: its open_clip config and the caption corpus stage ``train_clip`` trains it on."""

from __future__ import annotations

from pathlib import Path

from .. import clip_training
from ..clip_captions import CaptionCorpus
from ..context import StageContext

#: The tiny open_clip config the toy world's CLIP is trained from (``clip_configs/``).
TOY_CLIP_CONFIG = clip_training.TINY_CLIP_NAME


def register_toy_clip_config() -> None:
    clip_training.register_model_configs()


def toy_caption_corpus(ctx: StageContext) -> CaptionCorpus:
    """The world's captions, with the corpus variant ``train_clip.corpus`` (default ``captions``)."""
    config = ctx.config.train_clip
    corpus, augment = clip_training.toy_corpus_from_settings(
        Path(ctx.source.root),
        clip_training.toy_corpus_settings(config.corpus or "captions"),
        list(config.caption_splits),
    )
    return CaptionCorpus(corpus.samples, corpus.maskable, corpus.darken, augment)
