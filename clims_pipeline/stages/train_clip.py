"""Stage ``train_clip``: the CLIP that train_clims' evaluator freezes, trained on captions.

* Toy world (``--preset toy``): the tiny open_clip model ``clims-tiny-clip`` trained from scratch on the
  world's captions (``train_aug`` + the background-only training images), a few minutes on a CPU.
* Real data (``--set train_clip.enabled=true``): the camera-ready paper's fine-tuning of CLIP on label
  captions, "a photo of {class names}.", from the training split's labels (lr 5e-5, 20 epochs, weight
  decay 0.003).

The checkpoint is ``<workdir>/train_clip/<model>-<hash>.pt``, the hash covering every setting that changes
the weights, so a finished CLIP is reused by any later run with the same settings (and the ablation reuses
it across its rows and seeds). ``CLIPTextDrivenEvaluator.from_pretrained(<model>, pretrained=<file>)``
loads it; ``train_clims.clip_pretrained = "train_clip"`` points train_clims at it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ..context import StageContext, register_stage
from ..distributed import barrier

#: The value of ``train_clims.clip_pretrained`` that means "the checkpoint stage train_clip writes".
FROM_TRAIN_CLIP = "train_clip"


def clip_checkpoint_path(ctx: StageContext) -> Path:
    config = ctx.config.train_clip
    fingerprint = {
        **dataclasses.asdict(config),
        "data_root": str(getattr(ctx.source, "root", "")),
        "seed": 0,  # one CLIP per data set: every pipeline seed shares it
    }
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return ctx.workdir / "train_clip" / f"{config.model}-{digest}.pt"


def caption_samples(
    ctx: StageContext,
) -> tuple[list[tuple[Any, str]], list[bool] | None, list[bool] | None, Any]:
    """The (image, caption) pairs of ``train_clip``, which ones may be masked (None: all), which are
    darkened (None: none) and the augmentation (an ``Augment``)."""
    from ..clip_training import Augment, label_caption_samples, toy_corpus_from_settings, toy_corpus_settings

    config = ctx.config.train_clip
    root = Path(ctx.source.root)  # type: ignore[attr-defined]
    if config.captions == "toy":
        corpus, augment = toy_corpus_from_settings(
            root, toy_corpus_settings(config.toy_corpus), list(config.caption_splits)
        )
        return corpus.samples, corpus.maskable, corpus.darken, augment
    if config.captions == "labels":
        pairs: list[tuple[Any, str]] = [
            sample
            for split in config.caption_splits
            for sample in label_caption_samples(root, split, ctx.source.class_names)
        ]
        return pairs, None, None, Augment()
    raise ValueError(f"expected train_clip.captions 'toy' or 'labels', got {config.captions!r}")


def train_clip_checkpoint(ctx: StageContext) -> Path:
    """Train (or reuse) the CLIP of ``ctx.config.train_clip``; return its checkpoint."""
    from ..clip_training import train_clip

    config = ctx.config.train_clip
    out_path = clip_checkpoint_path(ctx)
    if out_path.exists() and not ctx.force:
        ctx.print(f"[train_clip] reusing {out_path}")
        return out_path
    if ctx.dist.is_main:  # a few minutes of a small model: one process trains, the others wait
        samples, maskable, darken, augment = caption_samples(ctx)
        ctx.print(f"[train_clip] {config.model} on {len(samples)} captions ({config.captions}) -> {out_path}")
        result = train_clip(
            samples,
            model_name=config.model,
            pretrained=None if config.pretrained in ("", "none") else config.pretrained,
            epochs=config.epochs,
            lr=config.lr,
            weight_decay=config.weight_decay,
            batch_size=config.batch_size,
            seed=0,
            out_path=out_path,
            device=ctx.device,
            max_steps=config.max_steps,
            quick_gelu=config.pretrained == "openai",
            maskable=maskable,
            darken=darken,
            fixed_logit_scale=config.fixed_logit_scale,
            augment=augment,
        )
        ctx.logger("train_clip").log("done", path=str(out_path), history=result.history)
    barrier()
    return out_path


def resolve_clip_pretrained(ctx: StageContext) -> str:
    """``train_clims.clip_pretrained`` with ``"train_clip"`` replaced by the stage's checkpoint file."""
    value = ctx.config.train_clims.clip_pretrained
    if value != FROM_TRAIN_CLIP:
        return value
    path = clip_checkpoint_path(ctx)
    if not path.exists():
        raise FileNotFoundError(f"train_clims.clip_pretrained=train_clip reads {path}: run stage train_clip")
    return str(path)


@register_stage(
    "train_clip",
    order=5,
    help="train (toy world) or fine-tune (label captions) the CLIP of the evaluator; off unless enabled",
)
def run(ctx: StageContext) -> None:
    if not ctx.config.train_clip.enabled:
        ctx.print("[train_clip] disabled (train_clip.enabled=false): train_clims uses its clip_pretrained")
        return
    train_clip_checkpoint(ctx)
