"""Normalisation constants (per-channel RGB mean and std in [0, 1] pixel units)."""

from __future__ import annotations

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The statistics OpenAI's CLIP was trained with; open_clip calls them OPENAI_DATASET_MEAN/STD.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Pixel values in [0, 1]: the identity normalisation, for callers whose images are not normalised.
UNIT_MEAN: tuple[float, float, float] = (0.0, 0.0, 0.0)
UNIT_STD: tuple[float, float, float] = (1.0, 1.0, 1.0)
