"""Loading a CLIP model and its tokenizer through open_clip, with the details that matter for CLIMS."""

from __future__ import annotations

import os
import pickle
from typing import Any, Protocol, cast

import torch
from torch import nn

__all__ = ["CLIPEncoders", "clip_input_size", "clip_normalization", "load_open_clip"]


class CLIPEncoders(Protocol):
    """What the evaluator needs of a CLIP: two encoders returning ``(n, D)`` embeddings."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


def as_clip_encoders(clip_model: object) -> CLIPEncoders:
    """``clip_model`` typed as `CLIPEncoders`, or a TypeError naming the missing encoder."""
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(clip_model, method, None)):
            raise TypeError(
                f"expected clip_model to have a callable {method}(), got {type(clip_model).__name__}"
            )
    return cast(CLIPEncoders, clip_model)


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as error:  # pragma: no cover - open_clip_torch is a hard dependency
        raise ImportError("loading CLIP needs open_clip: pip install open_clip_torch") from error
    return open_clip


def load_open_clip(
    name: str,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Build ``(model, tokenizer)`` with open_clip; the model is returned in eval mode.

    Args:
        name: an open_clip model name (``"ViT-B-32"``, ``"RN50"``, a name registered with
            ``open_clip.add_model_config``) or a ``"local-dir:/path"`` / ``"hf-hub:org/repo"`` source.
        pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), a local checkpoint
            file, or ``None`` for random initialisation. Tags are downloaded by open_clip into its
            cache; without network access, pass a local file.
        quick_gelu: OpenAI's weights were trained with QuickGELU, and a model built with plain GELU
            silently gives worse features. ``None`` takes the value the tag was trained with (and the
            ``-quickgelu`` suffix of the name); pass ``True`` for a local copy of OpenAI weights.
    """
    if not isinstance(name, str):
        raise TypeError(f"expected name to be an open_clip model name (str), got {type(name).__name__}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            "expected pretrained to be an open_clip tag, a file path or None, "
            f"got {type(pretrained).__name__}"
        )
    open_clip = _open_clip()
    pretrained_arg = None if pretrained is None else os.fspath(pretrained)
    is_file = pretrained_arg is not None and os.path.isfile(pretrained_arg)
    if is_file and os.path.getsize(cast(str, pretrained_arg)) == 0:
        raise ValueError(
            f"expected pretrained to be a CLIP checkpoint file, got an empty file (0 bytes): {pretrained_arg}"
        )
    is_tag = pretrained_arg is not None and not is_file and ":" not in name
    if is_tag:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained_arg)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(
                f"expected pretrained to be a local file or one of open_clip's tags for {name!r} "
                f"({', '.join(tags) or 'none'}), got {pretrained_arg!r}"
            )
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        model = open_clip.create_model(
            name,
            pretrained=pretrained_arg,
            force_quick_gelu=bool(quick_gelu),
            device=device,
            cache_dir=cache_dir,
            **model_kwargs,
        )
    except Exception as error:
        if not is_file:
            raise
        raise ValueError(_checkpoint_error(cast(str, pretrained_arg), name, error)) from error
    tokenizer = open_clip.get_tokenizer(name)
    # open_clip builds models in training mode; everything here uses CLIP frozen, as an evaluator.
    return model.eval(), tokenizer


def _raised_in_torch_load(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None:
        filename = traceback.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if filename.endswith(("torch/serialization.py", "torch/_weights_only_unpickler.py")):
            return True
        traceback = traceback.tb_next
    return False


def _checkpoint_error(path: str, name: str, error: BaseException) -> str:
    """What is wrong with the local checkpoint ``path``, from the error torch or open_clip raised."""
    message = str(error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = lines[0] if lines else "(no message)"
    if isinstance(error, EOFError) or "central directory" in message or "PytorchStreamReader" in message:
        problem = "it is truncated or corrupt (torch.load cannot read it)"
    elif isinstance(error, pickle.UnpicklingError):
        problem = (
            "torch.load(weights_only=True) refuses it: it is not a checkpoint, or it holds Python objects "
            "other than tensors (only load such a file yourself, and only from a trusted source)"
        )
        # torch's own first line suggests weights_only=False; its specific reason is further down.
        marker = "WeightsUnpickler error:"
        index = next((i for i, line in enumerate(lines) if marker in line), None)
        if index is not None:
            detail = lines[index][lines[index].index(marker) :]
            if detail == marker and index + 1 < len(lines):
                detail = f"{detail} {lines[index + 1]}"
    elif "state_dict" in message:
        problem = f"its tensors do not fit the open_clip model {name!r} (another architecture?)"
    elif _raised_in_torch_load(error):
        problem = "torch.load cannot read it: it is corrupt or not a checkpoint"
    else:
        problem = "open_clip could not build the model from it"
    return f"could not load the CLIP checkpoint {path}: {problem}. {type(error).__name__}: {detail[:300]}"


def clip_input_size(model: nn.Module, default: int = 224) -> int:
    """The square input side the image encoder expects (``model.visual.image_size``)."""
    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", None)
    if size is None:
        return default
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"expected a square CLIP input size, got {tuple(size)}")
        size = size[0]
    return int(size)


def clip_normalization(
    model: nn.Module, default: tuple[tuple[float, ...], tuple[float, ...]]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` the image encoder was trained with, as open_clip records them."""
    visual = getattr(model, "visual", None)
    mean = getattr(visual, "image_mean", None)
    std = getattr(visual, "image_std", None)
    if mean is None or std is None:
        return default
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
