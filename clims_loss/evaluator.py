"""``CLIPTextDrivenEvaluator``: a frozen CLIP turned into the CLIMS training signal for CAM maps."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clims_loss._validation import check_bool, check_channels, check_eps, check_positive_int
from clims_loss.clip_loading import CLIPEncoders, as_clip_encoders, clip_input_size, load_open_clip
from clims_loss.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from clims_loss.functional import LossWeights, btm_loss, cbs_loss, combine_losses, otm_loss, reg_loss
from clims_loss.masking import check_evaluator_inputs, masked_views, positive_pairs
from clims_loss.prompts import BackgroundPromptRegistry

__all__ = ["CLIPTextDrivenEvaluator", "EvaluatorOutput"]


@dataclass(frozen=True)
class EvaluatorOutput:
    """The loss of one step and its parts, with the per-pair similarities for logging.

    ``loss`` is the weighted sum (Eq. 13); ``otm``, ``btm``, ``cbs``, ``reg`` are the unweighted
    terms. ``sim_fg_text``/``sim_bg_text`` are ``(N,)``, ``sim_fg_bgtext`` is ``(N, L)``, and
    ``batch_index``/``class_index`` say which pair each row is.
    """

    loss: Tensor
    otm: Tensor
    btm: Tensor
    cbs: Tensor
    reg: Tensor
    sim_fg_text: Tensor
    sim_bg_text: Tensor
    sim_fg_bgtext: Tensor
    batch_index: Tensor
    class_index: Tensor

    def as_dict(self) -> dict[str, float]:
        """The five scalars as Python floats (one sync), for logging."""
        values = torch.stack([self.loss, self.otm, self.btm, self.cbs, self.reg]).detach().float().tolist()
        return dict(zip(("loss", "otm", "btm", "cbs", "reg"), values, strict=True))


def _as_registry(prompts: BackgroundPromptRegistry | str) -> BackgroundPromptRegistry:
    if isinstance(prompts, str):
        return BackgroundPromptRegistry.preset(prompts)
    if not isinstance(prompts, BackgroundPromptRegistry):
        raise TypeError(
            f"expected prompts to be a BackgroundPromptRegistry or a preset name, got {prompts!r}"
        )
    return prompts


def _normalised_range(mean: Sequence[float], std: Sequence[float]) -> tuple[float, float]:
    """The lowest and highest value pixels in ``[0, 1]`` take once normalised with ``mean``/``std``."""
    return min(-m / s for m, s in zip(mean, std, strict=True)), max(
        (1 - m) / s for m, s in zip(mean, std, strict=True)
    )


class CLIPTextDrivenEvaluator(nn.Module):
    """The text-driven evaluator of CLIMS (Fig. 2b): frozen CLIP + cached text + the four losses.

    Args:
        clip_model: an open_clip model, or any module with ``encode_image(images) -> (n, D)`` and
            ``encode_text(tokens) -> (n, D)``. It is frozen (no gradients, always in eval mode) and
            deliberately *not* registered as a submodule: it stays out of ``parameters()`` and
            ``state_dict()`` of any model the evaluator is put into, yet follows ``.to()``.
        tokenizer: ``tokenizer(list_of_str) -> LongTensor`` matching ``clip_model``.
        prompts: a `BackgroundPromptRegistry` or a preset name (default ``"voc"``).
        weights: ``alpha, beta, gamma, delta``; defaults to ``prompts.weights``.
        image_mean: per-channel mean with which the images passed to ``forward`` are normalised.
        image_std: per-channel std with which the images passed to ``forward`` are normalised.
        clip_mean: CLIP's own input mean (used by ``masking="pixel"``).
        clip_std: CLIP's own input std (used by ``masking="pixel"``).
        input_size: CLIP's input side; read from ``clip_model.visual.image_size`` when ``None``
            (when the model declares a size, a different ``input_size`` is an error).
        masking: overrides ``prompts.masking`` (``"pixel"`` or ``"pass_through"``).
        max_views_per_forward: cap on the views encoded at once. With a cap, the encoder runs in
            chunks under activation checkpointing, so peak memory stays flat as pairs grow (at the
            cost of a second encoder forward in backward).
        validate: check inputs for NaN, maps outside ``[0, 1]`` and non-binary labels (flags read at
            the sync that finding the positive pairs costs anyway), and, on the first call only, warn
            when the images look un-normalised (see `forward`).

    Shapes: ``images (B, 3, H, W)``, ``cams (B, K, h, w)`` in ``[0, 1]``, ``labels (B, K)`` multi-hot.

    Dtypes: ``images`` and ``cams`` may have any floating dtype, with or without autocast. The masked
    views are computed in at least float32 and cast to CLIP's parameter dtype for the image
    encoder; embeddings, similarities and the CLIP terms are in the text embeddings' dtype (at least
    float32); REG is in ``promote_types(cams.dtype, float32)``; ``loss`` is the promotion of both.
    """

    text_embeddings: Tensor
    background_embeddings: Tensor
    background_mask: Tensor
    class_pair_weights: Tensor
    image_mean: Tensor
    image_std: Tensor
    clip_mean: Tensor
    clip_std: Tensor

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        prompts: BackgroundPromptRegistry | str = "voc",
        *,
        weights: LossWeights | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
        input_size: int | None = None,
        masking: str | None = None,
        max_views_per_forward: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        as_clip_encoders(clip_model)
        if not callable(tokenizer):
            raise TypeError(
                f"expected tokenizer to be callable (list of str -> (n, context) token tensor), e.g. "
                f"open_clip.get_tokenizer(name), got {type(tokenizer).__name__}"
            )
        if max_views_per_forward is not None:
            try:
                max_views_per_forward = check_positive_int("max_views_per_forward", max_views_per_forward)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{error} (or None for no cap)") from None
        self.validate = check_bool("validate", validate)
        channels = {
            "image_mean": check_channels("image_mean", image_mean, positive=False),
            "image_std": check_channels("image_std", image_std, positive=True),
            "clip_mean": check_channels("clip_mean", clip_mean, positive=False),
            "clip_std": check_channels("clip_std", clip_std, positive=True),
        }
        self.prompts = _as_registry(prompts)
        if masking is not None:
            self.prompts = self.prompts.replace(masking=masking)
        self.weights = self.prompts.weights if weights is None else weights
        if not isinstance(self.weights, LossWeights):
            raise TypeError(f"expected weights to be a LossWeights, got {type(self.weights).__name__}")
        if self.weights.cbs != 0 and not self.prompts.uses_cbs:
            raise ValueError(
                f"expected background prompts in registry {self.prompts.name!r} because the CBS weight is "
                f"{self.weights.cbs}, got none; add class_backgrounds/global_backgrounds or set weights.cbs=0"
            )
        declared_size = clip_input_size(clip_model, default=0)
        if input_size is None:
            self.input_size = declared_size or 224
        else:
            self.input_size = check_positive_int("input_size", input_size)
            if declared_size and self.input_size != declared_size:
                raise ValueError(
                    f"expected input_size to be the CLIP's input side {declared_size} "
                    f"(clip_model.visual.image_size) or None, got {self.input_size}"
                )
        self.max_views_per_forward = max_views_per_forward
        # Pixel range of normalised images in [0, 1], for the first-call check of forward().
        self._normalised_range = _normalised_range(channels["image_mean"], channels["image_std"])
        self._image_normalisation = (channels["image_mean"], channels["image_std"])
        self._identity_normalisation = self._image_normalisation == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self._images_checked = False

        clip_model.eval()
        clip_model.requires_grad_(False)
        # A plain attribute, not a submodule: see the class docstring.
        self.__dict__["clip_model"] = clip_model

        # Normalisation constants are kept in float64 and rounded to the images' dtype when used.
        for buffer_name, values in channels.items():
            self.register_buffer(buffer_name, torch.tensor(values, dtype=torch.float64), persistent=False)
        self.register_buffer(
            "class_pair_weights",
            torch.tensor(self.prompts.pair_weights(), dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "background_mask",
            torch.tensor(self.prompts.background_mask(), dtype=torch.bool),
            persistent=False,
        )
        if self.background_mask.numel() == 0:
            self.background_mask = self.background_mask.reshape(self.prompts.num_classes, 0)

        text = self._encode_prompts(tokenizer, self.prompts.object_prompts())
        background = self._encode_prompts(tokenizer, self.prompts.background_prompts())
        if background.numel() == 0:
            background = text.new_zeros(0, text.shape[1])
        # Text embeddings are constants of the method: encoded once, normalised, kept as buffers.
        self.register_buffer("text_embeddings", text, persistent=False)
        self.register_buffer("background_embeddings", background, persistent=False)
        # eps meets the similarities' dtype here; the losses check it again against the dtype they see.
        check_eps("prompts.eps", self.prompts.eps, text.dtype)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name: str,
        pretrained: str | os.PathLike[str] | None = None,
        *,
        prompts: BackgroundPromptRegistry | str = "voc",
        quick_gelu: bool | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> CLIPTextDrivenEvaluator:
        """Build the evaluator around an open_clip model (see `clims_loss.load_open_clip`).

        ``pretrained`` is an open_clip tag (``"openai"``: QuickGELU is set for you), a local
        checkpoint file, or ``None`` for random weights. ``kwargs`` go to the constructor; CLIP's
        own normalisation is taken from the model unless ``clip_mean``/``clip_std`` are given.
        """
        model, tokenizer = load_open_clip(
            name, pretrained, quick_gelu=quick_gelu, device=device, cache_dir=cache_dir
        )
        visual = getattr(model, "visual", None)
        if getattr(visual, "image_mean", None) is not None and "clip_mean" not in kwargs:
            kwargs["clip_mean"] = tuple(visual.image_mean)  # type: ignore[union-attr]
            kwargs["clip_std"] = tuple(visual.image_std)  # type: ignore[union-attr]
        return cls(model, tokenizer, prompts, **kwargs).to(device)

    @property
    def clip_model(self) -> nn.Module:
        """The frozen CLIP (not a submodule; see the class docstring)."""
        return cast(nn.Module, self.__dict__["clip_model"])

    @property
    def _encoders(self) -> CLIPEncoders:
        return cast(CLIPEncoders, self.__dict__["clip_model"])

    @torch.no_grad()
    def _encode_prompts(self, tokenizer: Callable[[list[str]], Tensor], prompts: list[str]) -> Tensor:
        if not prompts:
            return torch.zeros(0, 0)
        tokens = tokenizer(prompts)
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[0] != len(prompts):
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise TypeError(f"expected tokenizer to return a (num_prompts, context) tensor, got {shape}")
        context_length = getattr(self.clip_model, "context_length", None)
        vocab_size = getattr(self.clip_model, "vocab_size", None)
        if context_length is not None and tokens.shape[1] != context_length:
            raise ValueError(
                f"tokenizer/model mismatch: expected tokens of context length {context_length} "
                f"(the model's), got {tokens.shape[1]}"
            )
        if vocab_size is not None and int(tokens.max()) >= vocab_size:
            raise ValueError(
                f"tokenizer/model mismatch: expected token ids < {vocab_size} (the model's vocabulary), "
                f"got id {int(tokens.max())}"
            )
        device = next(iter(self._clip_tensors()), torch.empty(0)).device
        embeddings = self._encoders.encode_text(tokens.to(device))
        # At least float32, so half-precision encoders still give precise similarities.
        embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
        return nn.functional.normalize(embeddings, dim=-1)

    def _clip_dtype(self) -> torch.dtype | None:
        """The dtype of the image encoder's first floating parameter (``None`` without any)."""
        encoder = getattr(self.clip_model, "visual", None)
        module = encoder if isinstance(encoder, nn.Module) else self.clip_model
        return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)

    def _clip_tensors(self) -> Iterator[Tensor]:
        yield from self.clip_model.parameters()
        yield from self.clip_model.buffers()

    # ------------------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CLIPTextDrivenEvaluator:  # type: ignore[override]
        # .to()/.cuda()/.double() must reach CLIP although it is not a submodule.
        self.clip_model._apply(fn)  # type: ignore[no-untyped-call]
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return self

    def train(self, mode: bool = True) -> CLIPTextDrivenEvaluator:
        # The evaluator has no trainable state; CLIP stays in eval mode whatever the parent does.
        super().train(mode)
        self.clip_model.eval()
        return self

    # ------------------------------------------------------------------------------ forward
    def encode_views(self, views: Tensor) -> Tensor:
        """``(n, 3, S, S) -> (n, D)`` L2-normalised image embeddings, chunked when capped.

        The views are cast to CLIP's parameter dtype (the encoder's own casts, e.g. open_clip's
        ``x + class_embedding.to(x.dtype)``, cannot mix dtypes without autocast); the embeddings take
        the text embeddings' dtype, so similarities are at least float32, also under autocast.
        """
        clip_dtype = self._clip_dtype()
        if clip_dtype is not None and views.dtype != clip_dtype:
            views = views.to(clip_dtype)
        cap = self.max_views_per_forward
        if cap is None or views.shape[0] <= cap:
            features = self._encoders.encode_image(views)
        else:
            # Checkpointing each chunk frees its activations until backward, so memory stays flat.
            encode = self._encoders.encode_image
            chunks = [
                checkpoint(encode, chunk, use_reentrant=False)
                if torch.is_grad_enabled() and chunk.requires_grad
                else encode(chunk)
                for chunk in torch.split(views, cap)
            ]
            features = torch.cat(chunks)
        return nn.functional.normalize(features.to(self.text_embeddings.dtype), dim=-1)

    def forward(self, images: Tensor, cams: Tensor, labels: Tensor) -> EvaluatorOutput:
        """The CLIMS loss of a batch.

        Args:
            images: ``(B, 3, H, W)``, normalised with ``image_mean``/``image_std``, any floating dtype.
            cams: ``(B, K, h, w)`` activation maps in ``[0, 1]`` (``sigmoid`` of the CAM logits), any
                floating dtype; values beyond ``[0, 1]`` by up to ``max(1e-6, torch.finfo(dtype).eps)``
                are rounding and accepted.
            labels: ``(B, K)`` multi-hot image labels.

        With ``validate``, the first call (only) reads the images' range and warns (``UserWarning``)
        when they look un-normalised: far outside what ``image_mean``/``image_std`` give for pixels in
        ``[0, 1]`` (e.g. left in 0..255), or all inside ``[0, 1]`` when a non-identity normalisation is
        expected. Later calls skip it, so they pay no extra host-device sync.
        """
        pending = check_evaluator_inputs(images, cams, labels, validate=self.validate)
        num_classes = self.text_embeddings.shape[0]
        if cams.shape[1] != num_classes:
            raise ValueError(
                f"expected cams of shape (B, K, h, w) with K = {num_classes} classes of registry "
                f"{self.prompts.name!r}, got {tuple(cams.shape)}"
            )
        if images.device != self.text_embeddings.device:
            raise ValueError(
                f"expected images on the evaluator's device {self.text_embeddings.device}, "
                f"got {images.device}; move the evaluator with .to(device)"
            )
        batch_index, class_index = positive_pairs(labels)
        pending.raise_if_failed()
        if self.validate and not self._images_checked:
            self._check_image_range(images)
        num_pairs = int(batch_index.shape[0])
        weights = self.weights
        need_fg = num_pairs > 0 and (weights.otm != 0 or weights.cbs != 0)
        need_bg = num_pairs > 0 and weights.btm != 0

        views = masked_views(
            images,
            cams,
            labels,
            size=self.input_size,
            mode=self.prompts.masking,
            image_mean=self.image_mean,
            image_std=self.image_std,
            clip_mean=self.clip_mean,
            clip_std=self.clip_std,
            pairs=(batch_index, class_index),
            validate=False,
        )
        # One encoder call over [fg; bg]; a term whose weight is 0 does not pay for its views.
        if need_fg and need_bg:
            features = self.encode_views(views.views)
            fg_features, bg_features = features[:num_pairs], features[num_pairs:]
        else:
            empty = self.text_embeddings.new_zeros(num_pairs, self.text_embeddings.shape[1])
            fg_features = self.encode_views(views.fg) if need_fg else empty
            bg_features = self.encode_views(views.bg) if need_bg else empty

        pair_text = self.text_embeddings[class_index]
        sim_fg_text = (fg_features * pair_text).sum(dim=-1)
        sim_bg_text = (bg_features * pair_text).sum(dim=-1)
        sim_fg_bgtext = fg_features @ self.background_embeddings.T
        prompt_mask = self.background_mask[class_index]
        pair_weights = self.class_pair_weights[class_index]

        eps, similarity, pair_reduction = (
            self.prompts.eps,
            self.prompts.similarity,
            self.prompts.pair_reduction,
        )
        otm = otm_loss(
            sim_fg_text,
            pair_weights,
            eps=eps,
            similarity=similarity,
            reduction=pair_reduction,
            validate=False,
        )
        btm = btm_loss(
            sim_bg_text,
            pair_weights,
            eps=eps,
            similarity=similarity,
            reduction=pair_reduction,
            validate=False,
        )
        cbs = cbs_loss(
            sim_fg_bgtext,
            prompt_mask,
            threshold=self.prompts.cbs_threshold,
            prompt_reduction=self.prompts.cbs_prompt_reduction,
            eps=eps,
            similarity=similarity,
            reduction=self.prompts.cbs_reduction,
            validate=False,
        )
        reg = reg_loss(cams, labels, positive_only=self.prompts.reg_positive_only, validate=False)
        # Terms switched off by a zero weight are exact zeros (no encoder pass was spent on them).
        otm, btm, cbs = (
            term if need else term.detach() * 0
            for term, need in ((otm, need_fg), (btm, need_bg), (cbs, need_fg))
        )
        loss = combine_losses(otm, btm, cbs, reg, weights)
        return EvaluatorOutput(
            loss=loss,
            otm=otm,
            btm=btm,
            cbs=cbs,
            reg=reg,
            sim_fg_text=sim_fg_text,
            sim_bg_text=sim_bg_text,
            sim_fg_bgtext=sim_fg_bgtext,
            batch_index=batch_index,
            class_index=class_index,
        )

    @torch.compiler.disable  # type: ignore[misc, untyped-decorator]
    def _check_image_range(self, images: Tensor) -> None:
        """Warn once if the images look un-normalised (see `forward`); one sync, first call only."""
        self._images_checked = True
        if images.numel() == 0:
            return
        with torch.autocast(images.device.type, enabled=False):  # CPU autocast refuses to stack float16
            low, high = torch.stack([images.min().double(), images.max().double()]).tolist()
        expected_low, expected_high = self._normalised_range
        span = expected_high - expected_low
        mean, std = self._image_normalisation
        if low < expected_low - 2 * span or high > expected_high + 2 * span:
            warnings.warn(
                f"images passed to CLIPTextDrivenEvaluator lie in [{low:.4g}, {high:.4g}], far outside "
                f"[{expected_low:.3g}, {expected_high:.3g}], the range of pixels in [0, 1] normalised with "
                f"image_mean={mean}, image_std={std}; are they still in 0..255? Scale them to [0, 1] and "
                "normalise them, or pass the image_mean/image_std they were normalised with "
                "(checked on the first call only)",
                UserWarning,
                stacklevel=6,  # the caller of evaluator(...): past forward and its wrappers
            )
        elif not self._identity_normalisation and low >= 0.0 and high <= 1.0:
            warnings.warn(
                f"images passed to CLIPTextDrivenEvaluator lie in [{low:.4g}, {high:.4g}], like raw pixels "
                f"in [0, 1], but the evaluator expects them normalised with image_mean={mean}, "
                f"image_std={std}; for raw pixels pass image_mean=clims_loss.UNIT_MEAN, "
                "image_std=clims_loss.UNIT_STD (checked on the first call only)",
                UserWarning,
                stacklevel=6,  # the caller of evaluator(...): past forward and its wrappers
            )

    def extra_repr(self) -> str:
        return (
            f"prompts={self.prompts.name!r}, classes={self.prompts.num_classes}, "
            f"background_prompts={self.background_embeddings.shape[0]}, weights={self.weights}, "
            f"masking={self.prompts.masking!r}, input_size={self.input_size}"
        )
