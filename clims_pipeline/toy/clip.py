"""The toy world's tiny CLIP: its open_clip config, its training corpora, and what it learned.

The tiny CLIP (``TOY_CLIP_CONFIG``: open_clip's ModifiedResNet image tower, widths 16-512, one block per
stage, at 64 px; a 3-layer, 64-wide text transformer; 4.7M parameters, 3.2M of them the 49,408-token
embedding) is trained from scratch on a toy world's captions by stage ``train_clip``
(``clims_pipeline.clip_training.train_clip``)::

    corpus, augment = toy_corpus_from_settings(root, toy_corpus_settings("web_dark"), ["train_aug"])
    train_clip(corpus.samples, model_name=TOY_CLIP_CONFIG, **TOY_FROM_SCRATCH, augment=augment, ...)

``zero_shot_report`` measures zero-shot accuracy on held-out toy-world images and the co-occurrence
bias: how similar background-only images (water alone) are to a class prompt ("boat") compared with
real images of that class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import open_clip
import torch
from PIL import Image

from ..clip_captions import CaptionCorpus
from ..clip_training import (
    Augment,
    ImageSource,
    _average_precision,
    _default_device,
    _encode_images,
    _encode_texts,
    _find_image,
    _image_size,
    _load_images,
    _mean,
    _normaliser,
    create_model,
)
from ..context import StageContext
from .world import (
    BACKGROUND_TERMS,
    CLASS_BACKGROUND,
    TOY_BACKGROUNDS,
    TOY_CLASSES,
    image_path,
    read_captions,
    render_background_captions,
    render_object_cutouts,
    world_settings,
)

#: The tiny open_clip config the toy world's CLIP is trained from (``clip_configs/<name>.json``).
TOY_CLIP_CONFIG = "clims-toy-clip"
CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"


def register_toy_clip_config() -> None:
    """Make the tiny config known to open_clip (idempotent)."""
    if TOY_CLIP_CONFIG not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR / f"{TOY_CLIP_CONFIG}.json")


register_toy_clip_config()


#: Training the tiny CLIP from scratch on the toy world (the toy preset's train_clip settings).
TOY_FROM_SCRATCH: dict[str, float] = {"lr": 2e-3, "epochs": 5, "weight_decay": 0.1}


def toy_world_samples(
    root: str | os.PathLike[str], splits: Sequence[str] = ("train_aug", "background_only_train")
) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a toy world's ``captions.jsonl``, restricted to ``splits``."""
    root = Path(root)
    samples = []
    with open(root / "captions.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["split"] in splits:
                samples.append((_find_image(root, record["id"]), record["caption"]))
    if not samples:
        raise ValueError(f"no captions of splits {list(splits)} in {root / 'captions.jsonl'}")
    return samples


#: The toy CLIP's training corpora. "captions": the world's captioned scenes and background-only
#: images, any of them masked in normalised space . "web": the
#: same plus objects cut out on black and more object-free pictures, masks in pixel space (black, as the
#: evaluator's default masking) on those only. "web_dark": "web" with the cut-outs the only masked
#: samples (a masked background picture teaches that black means a background) and 1,000 scene copies,
#: darkened by 1e-4..0.15 and captioned as dark pictures (an almost black view shows nothing). See
#: ``toy_clip_corpus`` and docs/toyworld.md.
TOY_CLIP_CORPORA: dict[str, dict[str, Any]] = {
    "captions": {
        "object_cutouts": 0,
        "extra_backgrounds": 0,
        "mask_scenes": True,
        "mask_backgrounds": True,
        "dark_copies": 0,
        "mask_space": "normalised",
    },
    "web": {
        "object_cutouts": 1500,
        "extra_backgrounds": 1000,
        "mask_scenes": False,
        "mask_backgrounds": True,
        "dark_copies": 0,
        "mask_space": "pixel",
    },
    "web_dark": {
        "object_cutouts": 1500,
        "extra_backgrounds": 1000,
        "mask_scenes": False,
        "mask_backgrounds": False,
        "dark_copies": 1000,
        "mask_space": "pixel",
    },
}

#: Captions of the darkened scene copies ("web_dark").
DARK_CAPTIONS = (
    "a black image.",
    "a dark picture.",
    "black.",
    "an empty black photo.",
    "a photo of nothing.",
)


class ToyClipCorpus(NamedTuple):
    """The toy CLIP's training pairs, which of them the masking augmentation may touch, and which are
    dark copies (``train_clip``'s ``maskable`` and ``darken``)."""

    samples: list[tuple[ImageSource, str]]
    maskable: list[bool]
    darken: list[bool]


def toy_corpus_settings(name: str) -> dict[str, Any]:
    """The settings of a named toy CLIP corpus; a clear error for an unknown name."""
    if name not in TOY_CLIP_CORPORA:
        raise ValueError(f"expected a toy CLIP corpus from {list(TOY_CLIP_CORPORA)}, got {name!r}")
    return TOY_CLIP_CORPORA[name]


def toy_clip_corpus(
    root: str | os.PathLike[str],
    splits: Sequence[str] = ("train_aug", "background_only_train"),
    *,
    object_cutouts: int = 0,
    extra_backgrounds: int = 0,
    mask_scenes: bool = True,
    mask_backgrounds: bool = True,
    dark_copies: int = 0,
    seed: int = 0,
) -> ToyClipCorpus:
    """The toy CLIP's training pairs, which of them the masking augmentation may touch, which are dark.

    The world's captioned scenes and background-only images, plus ``object_cutouts`` objects cut out on
    black and ``extra_backgrounds`` object-free pictures, rendered fresh (``render_object_cutouts``,
    ``render_background_captions``), as a web-scale corpus has both. Scenes are masked only with
    ``mask_scenes``: a mask that hides the object while the caption names it teaches CLIP that the
    surroundings are the object. Background pictures are masked only with ``mask_backgrounds``: black
    fill under a background caption makes black read as a background. ``dark_copies`` scenes (drawn
    with ``seed``) are added again with a dark-picture caption, to be darkened by ``train_clip``. The
    cut-outs and pictures are drawn by the world's own kind (``toyworld.json``), at its context rate.
    """

    records = read_captions(root, splits)
    if not records:
        raise ValueError(f"no captions of splits {list(splits)} in {Path(root) / 'captions.jsonl'}")
    samples: list[tuple[ImageSource, str]] = [(image_path(root, r["id"]), r["caption"]) for r in records]
    is_background = [r["split"].startswith("background_only") for r in records]
    maskable = [mask_backgrounds if background else mask_scenes for background in is_background]
    scenes = [image for (image, _), background in zip(samples, is_background, strict=True) if not background]
    kind, context_rate = world_settings(root)
    cutouts = render_object_cutouts(object_cutouts, seed=seed, context_rate=context_rate, kind=kind)
    backgrounds = render_background_captions(extra_backgrounds, seed=seed, kind=kind)
    for (images, captions), may_mask in ((cutouts, True), (backgrounds, mask_backgrounds)):
        samples += list(zip(list(images), captions, strict=True))
        maskable += [may_mask] * len(captions)
    darken = [False] * len(samples)
    if dark_copies and not scenes:
        raise ValueError(f"dark_copies={dark_copies} needs scenes, but {root} has no captioned scenes")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 96]))
    for index in range(dark_copies):
        samples.append((scenes[int(rng.integers(len(scenes)))], DARK_CAPTIONS[index % len(DARK_CAPTIONS)]))
        maskable.append(False)
        darken.append(True)
    return ToyClipCorpus(samples, maskable, darken)


def toy_corpus_from_settings(
    root: str | os.PathLike[str],
    settings: dict[str, Any],
    splits: Sequence[str] = ("train_aug", "background_only_train"),
) -> tuple[ToyClipCorpus, Augment]:
    """``toy_clip_corpus`` with a ``TOY_CLIP_CORPORA`` entry's settings, and the augmentation they ask for."""
    corpus = toy_clip_corpus(
        root,
        splits,
        object_cutouts=settings["object_cutouts"],
        extra_backgrounds=settings["extra_backgrounds"],
        mask_scenes=settings["mask_scenes"],
        mask_backgrounds=settings["mask_backgrounds"],
        dark_copies=settings["dark_copies"],
    )
    return corpus, Augment(space=settings["mask_space"])


def zero_shot_report(
    root: str | os.PathLike[str],
    *,
    model_name: str = TOY_CLIP_CONFIG,
    pretrained: str | os.PathLike[str] | None,
    split: str = "val",
    background_split: str = "background_only_val",
    template: str = "a photo of {}.",
    device: str | torch.device | None = None,
    batch_size: int = 256,
    quick_gelu: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy and co-occurrence bias of a CLIP on a toy world's held-out images.

    Class prompts are ``template.format(class)``, background prompts ``template.format(term)`` with each
    background's first (canonical) term. Images are normalised with the model's mean/std; "masked"
    views multiply the normalised image by the exact object mask (what the CLIMS evaluator does with a
    perfect CAM): ``object view`` keeps the object, ``context view`` keeps everything else.

    Per class k with background b(k), cosine similarities to the prompt of k (means):
    ``object_images`` (val images containing k), ``absent_images`` (val images without k),
    ``own_background_only`` (background-only images of b(k)), ``other_background_only`` (the other
    backgrounds), ``object_view`` and ``context_view`` (masked views of val images containing k).
    ``bias_ratio`` = own_background_only / object_images: near 1 means CLIP calls water alone a boat
    almost as much as a real boat. ``background_top_class`` = the share of background-only images of
    b(k) whose best class prompt is k. ``background_prompt_wins`` = share of background-only images of
    b(k) closer to b's prompt than to k's; ``object_prompt_wins`` = share of object views of k closer to
    k's prompt than to b(k)'s (what the background suppression loss relies on).
    """

    root = Path(root)
    device = _default_device(device)
    model, tokenizer = create_model(model_name, pretrained, device, quick_gelu=quick_gelu)
    model.eval()
    size = _image_size(model)
    mean, std = _normaliser(model, device)
    classes = list(TOY_CLASSES)
    backgrounds = list(TOY_BACKGROUNDS)
    class_text = _encode_texts(model, tokenizer, [template.format(c) for c in classes], device)
    background_text = _encode_texts(
        model, tokenizer, [template.format(BACKGROUND_TERMS[b][0]) for b in backgrounds], device
    )

    records = read_captions(root, [split])
    if not records:
        raise ValueError(f"no images of split {split!r} in {root}")
    pixels = _load_images([_find_image(root, r["id"]) for r in records], size, progress=False)
    masks = np.stack(
        [
            np.asarray(
                Image.open(root / "SegmentationClass" / f"{r['id']}.png").resize(
                    (size, size), Image.Resampling.NEAREST
                )
            )
            for r in records
        ]
    )
    normalised = (pixels.float().to(device) / 255.0 - mean) / std
    image_embeddings = _encode_images(model, normalised, batch_size)
    similarity = (image_embeddings @ class_text.T).cpu().numpy()  # (N, K)
    labels = np.zeros((len(records), len(classes)), bool)
    for row, record in enumerate(records):
        for label in record["labels"]:
            labels[row, label - 1] = True

    top = similarity.argmax(1)
    single = labels.sum(1) == 1
    report: dict[str, Any] = {
        "split": split,
        "images": len(records),
        "template": template,
        "top1_accuracy_single_class": float((labels[np.arange(len(top)), top])[single].mean()),
        "single_class_images": int(single.sum()),
        "top1_in_labels_all": float(labels[np.arange(len(top)), top].mean()),
        "mean_average_precision": float(
            np.nanmean([_average_precision(similarity[:, k], labels[:, k]) for k in range(len(classes))])
        ),
        "per_class": {},
    }

    background_records = [r for r in read_captions(root, [background_split]) if len(r["backgrounds"]) == 1]
    bg_pixels = _load_images([_find_image(root, r["id"]) for r in background_records], size, progress=False)
    bg_embeddings = _encode_images(model, (bg_pixels.float().to(device) / 255.0 - mean) / std, batch_size)
    bg_class_similarity = (bg_embeddings @ class_text.T).cpu().numpy()
    bg_background_similarity = (bg_embeddings @ background_text.T).cpu().numpy()
    bg_names = np.array([r["backgrounds"][0] for r in background_records])
    report["background_only_images"] = len(background_records)
    if len(background_records):
        report["background_zero_shot_accuracy"] = float(
            (np.array(backgrounds)[bg_background_similarity.argmax(1)] == bg_names).mean()
        )

    for k, class_name in enumerate(classes):
        own = CLASS_BACKGROUND[class_name]
        b = backgrounds.index(own)
        has_k = labels[:, k]
        own_bg = bg_names == own
        object_view_sim = object_view_bg_sim = context_view_sim = np.zeros(0)
        if has_k.any():
            rows = torch.from_numpy(np.flatnonzero(has_k)).to(device)
            object_mask = torch.from_numpy(masks[has_k] == k + 1).to(device).unsqueeze(1).float()
            object_views = _encode_images(model, normalised[rows] * object_mask, batch_size)
            context_views = _encode_images(model, normalised[rows] * (1 - object_mask), batch_size)
            object_view_sim = (object_views @ class_text[k]).cpu().numpy()
            object_view_bg_sim = (object_views @ background_text[b]).cpu().numpy()
            context_view_sim = (context_views @ class_text[k]).cpu().numpy()
        entry: dict[str, Any] = {
            "background": own,
            "object_images": _mean(similarity[has_k, k]),
            "absent_images": _mean(similarity[~has_k, k]),
            "own_background_only": _mean(bg_class_similarity[own_bg, k]),
            "other_background_only": _mean(bg_class_similarity[~own_bg, k]),
            "object_view": _mean(object_view_sim),
            "context_view": _mean(context_view_sim),
            "background_top_class": _mean(bg_class_similarity[own_bg].argmax(1) == k),
            "background_prompt_wins": _mean(
                bg_background_similarity[own_bg, b] > bg_class_similarity[own_bg, k]
            ),
            "object_prompt_wins": _mean(object_view_sim > object_view_bg_sim),
        }
        entry["bias_ratio"] = entry["own_background_only"] / entry["object_images"]
        report["per_class"][class_name] = entry
    return report


def format_report(report: dict[str, Any]) -> str:
    """The zero-shot report as a small text table."""
    lines = [
        f"zero-shot on {report['images']} {report['split']} images (prompt {report['template']!r}): "
        f"top-1 accuracy on single-class images {report['top1_accuracy_single_class']:.3f} "
        f"(n={report['single_class_images']}), top-1 in labels (all) {report['top1_in_labels_all']:.3f}, "
        f"mAP {report['mean_average_precision']:.3f}; background zero-shot accuracy "
        f"{report.get('background_zero_shot_accuracy', float('nan')):.3f} "
        f"on {report['background_only_images']} background-only images",
        "cosine similarity to the class prompt (mean):",
        f"{'class':<10} {'bg':<9} {'object':>7} {'absent':>7} {'own-bg':>7} {'other-bg':>8} {'ratio':>6} "
        f"{'obj-view':>8} {'ctx-view':>8} {'bg->cls':>7} {'bgtxt>cls':>9} {'cls>bgtxt':>9}",
    ]
    for name, e in report["per_class"].items():
        lines.append(
            f"{name:<10} {e['background']:<9} {e['object_images']:7.3f} {e['absent_images']:7.3f} "
            f"{e['own_background_only']:7.3f} {e['other_background_only']:8.3f} {e['bias_ratio']:6.2f} "
            f"{e['object_view']:8.3f} {e['context_view']:8.3f} {e['background_top_class']:7.2f} "
            f"{e['background_prompt_wins']:9.2f} {e['object_prompt_wins']:9.2f}"
        )
    lines.append(
        "object = val images with the class; absent = without; own-bg / other-bg = background-only "
        "images of the class's / other backgrounds; ratio = own-bg / object; obj-view / ctx-view = "
        "image times exact object mask / times its complement; bg->cls = share of own-bg images "
        "whose best class is this class; bgtxt>cls = share of own-bg images closer to the "
        "background prompt; cls>bgtxt = share of object views closer to the class prompt."
    )
    return "\n".join(lines)


def toy_caption_corpus(ctx: StageContext) -> CaptionCorpus:
    """Stage ``train_clip``'s captions on the toy world: the corpus ``train_clip.corpus`` (default
    ``captions``)."""
    config = ctx.config.train_clip
    corpus, augment = toy_corpus_from_settings(
        Path(ctx.source.root), toy_corpus_settings(config.corpus or "captions"), list(config.caption_splits)
    )
    return CaptionCorpus(corpus.samples, corpus.maskable, corpus.darken, augment)
