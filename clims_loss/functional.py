"""The four CLIMS losses (Eqs. 6-13 of the paper) as pure tensor functions.

Nothing here knows about CLIP: the inputs are cosine similarities and activation maps, so the
maths can be tested, reused with any encoder and differentiated in float64.

Shapes, used throughout the package:

* ``B`` images, ``K`` classes, ``h x w`` map resolution;
* ``N`` positive (image, class) pairs, i.e. the non-zero entries of the ``(B, K)`` labels;
* ``L`` background prompts, ``D`` embedding width.

Cosine similarities inside logarithms
-------------------------------------
The paper writes ``log s`` and ``log(1 - s)`` of a cosine similarity ``s``, which lies in
``[-1, 1]``: ``log s`` is undefined for ``s <= 0`` and ``log(1 - s)`` for ``s >= 1``. Such values are
real (a randomly initialised or fine-tuned CLIP produces them), so every loss first maps ``s`` to a
probability-like ``p`` in ``[eps, 1 - eps]`` with `similarity_to_probability`:

* ``similarity="clamp"`` (default, as the official improved code): ``p = clamp(s, eps, 1 - eps)``.
  Inside the interval nothing changes; outside it the loss saturates and its gradient is zero.
* ``similarity="affine"``: ``p = clamp((s + 1) / 2, eps, 1 - eps)``, which keeps a gradient for
  negative similarities at the price of changing the loss's scale.

``eps`` defaults to ``1e-4`` (the official code's bounds ``[1e-4, 0.9999]``). It must lie in
``(0, 0.5)`` and be at least ``torch.finfo(dtype).eps`` of the dtype the clamp happens in (1.19e-7 in
float32, 2.2e-16 in float64): below that, ``1 - eps`` rounds to ``1`` and ``log(1 - p)`` is ``-inf``.
Every loss is therefore finite, with a finite gradient, for any finite input and any accepted setting.

Dtypes
------
One rule for every loss: it computes, and returns, in ``torch.promote_types(input dtypes, float32)``.
float16 and bfloat16 similarities or maps are upcast to float32 before the clamp and the logs (their
own ``1 - 1e-4`` rounds to ``1``), float32 stays float32, float64 stays float64; optional ``weights``
take part in the promotion. `similarity_to_probability` follows the same rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from clims_loss._validation import (
    binary_check,
    check_bool,
    check_choice,
    check_eps,
    check_floating,
    check_map_size,
    check_rank,
    check_real,
    check_reduction,
    check_same_device,
    check_tensor,
    check_values,
    compute_dtype,
    finite_check,
    unit_interval_check,
)

Reduction = Literal["none", "mean", "sum"]
SimilarityMode = Literal["clamp", "affine"]
SIMILARITY_MODES = ("clamp", "affine")
DEFAULT_EPS = 1e-4

__all__ = [
    "LossWeights",
    "btm_loss",
    "cbs_loss",
    "combine_losses",
    "otm_loss",
    "reduce_loss",
    "reg_loss",
    "similarity_to_probability",
]


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` over every element of ``loss``.

    ``"mean"`` of an empty tensor is ``0`` (not NaN), so a batch without positive pairs is harmless.

    >>> reduce_loss(torch.tensor([1.0, 3.0]), "mean")
    tensor(2.)
    """
    check_reduction(reduction)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(loss.numel(), 1)


def similarity_to_probability(similarity: Tensor, *, mode: str = "clamp", eps: float = DEFAULT_EPS) -> Tensor:
    """Map cosine similarities into ``[eps, 1 - eps]`` so that both logs of the paper are finite.

    Computed and returned in at least float32 (see the module docs, "Dtypes").

    >>> similarity_to_probability(torch.tensor([-0.5, 0.3, 1.0]))
    tensor([1.0000e-04, 3.0000e-01, 9.9990e-01])
    >>> similarity_to_probability(torch.tensor([-1.0, 0.0]), mode="affine")
    tensor([1.0000e-04, 5.0000e-01])
    """
    similarity = check_tensor("similarity", similarity)
    check_floating("similarity", similarity)
    check_choice("similarity", mode, SIMILARITY_MODES)
    similarity = similarity.to(compute_dtype(similarity.dtype))
    check_eps("eps", eps, similarity.dtype)
    if mode == "affine":
        similarity = (similarity + 1.0) / 2.0
    return similarity.clamp(eps, 1.0 - eps)


def _check_pair_inputs(name: str, similarity: object, weights: Tensor | None, validate: bool) -> Tensor:
    similarity = check_tensor(name, similarity)
    check_floating(name, similarity)
    check_rank(name, similarity, 1, "(N,)")
    check_bool("validate", validate)
    if weights is not None:
        check_tensor("weights", weights)
        check_floating("weights", weights)
        if weights.shape != similarity.shape:
            raise ValueError(
                f"expected weights of shape (N,) = {tuple(similarity.shape)} matching {name}, "
                f"got {tuple(weights.shape)}"
            )
        check_same_device(**{name: similarity, "weights": weights})
    if validate:
        checks = [finite_check(name, similarity)]
        if weights is not None:
            checks.append(finite_check("weights", weights))
        check_values(checks)
    return similarity


def _upcast(similarity: Tensor, weights: Tensor | None) -> Tensor:
    """``similarity`` in the dtype the losses compute in (see the module docs, "Dtypes")."""
    dtypes = (similarity.dtype,) if weights is None else (similarity.dtype, weights.dtype)
    return similarity.to(compute_dtype(*dtypes))


def otm_loss(
    sim_fg_text: Tensor,
    weights: Tensor | None = None,
    *,
    eps: float = DEFAULT_EPS,
    similarity: str = "clamp",
    reduction: str = "mean",
    validate: bool = True,
) -> Tensor:
    """Object region and text label matching, Eq. 6: ``-w * log s(v_io, t_k)`` per positive pair.

    Args:
        sim_fg_text: ``(N,)`` cosine similarity of each pair's foreground view with its class prompt.
        weights: optional ``(N,)`` per-pair weights (the camera-ready code weights some classes 3x).
        eps: similarities are clamped to ``[eps, 1 - eps]`` inside the log (see the module docs).
        similarity: ``"clamp"`` or ``"affine"`` (see the module docs).
        reduction: ``"none"`` -> ``(N,)``; ``"mean"`` over pairs (the official code); ``"sum"`` (Eq. 6).
        validate: check the values for NaN/inf (one host-device sync).

    >>> otm_loss(torch.tensor([0.5, 1.0]), reduction="none")
    tensor([6.9315e-01, 1.0002e-04])
    """
    sim_fg_text = _check_pair_inputs("sim_fg_text", sim_fg_text, weights, validate)
    check_reduction(reduction)
    loss = -torch.log(similarity_to_probability(_upcast(sim_fg_text, weights), mode=similarity, eps=eps))
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    return reduce_loss(loss, reduction)


def btm_loss(
    sim_bg_text: Tensor,
    weights: Tensor | None = None,
    *,
    eps: float = DEFAULT_EPS,
    similarity: str = "clamp",
    reduction: str = "mean",
    validate: bool = True,
) -> Tensor:
    """Background region and text label matching, Eq. 8: ``-w * log(1 - s(v_ib, t_k))`` per pair.

    Args:
        sim_bg_text: ``(N,)`` cosine similarity of each pair's background view with its class prompt.
        weights: optional ``(N,)`` per-pair weights.
        eps: as `otm_loss`.
        similarity: as `otm_loss`.
        reduction: as `otm_loss`.
        validate: as `otm_loss`.

    >>> btm_loss(torch.tensor([0.5, 0.0]), reduction="sum")
    tensor(0.6932)
    """
    sim_bg_text = _check_pair_inputs("sim_bg_text", sim_bg_text, weights, validate)
    check_reduction(reduction)
    loss = -torch.log1p(-similarity_to_probability(_upcast(sim_bg_text, weights), mode=similarity, eps=eps))
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    return reduce_loss(loss, reduction)


def cbs_loss(
    sim_fg_bgtext: Tensor,
    prompt_mask: Tensor | None = None,
    *,
    threshold: float | None = None,
    prompt_reduction: str = "sum",
    eps: float = DEFAULT_EPS,
    similarity: str = "clamp",
    reduction: str = "sum",
    validate: bool = True,
) -> Tensor:
    """Co-occurring background suppression, Eq. 10: ``-log(1 - s(v_io, t_bg))`` over pairs and prompts.

    Both official variants are covered:

    * class-specific prompts (paper, camera-ready): ``prompt_mask[n, l]`` says whether background
      prompt ``l`` belongs to pair ``n``'s class; the camera-ready code averages over a class's
      prompts (``prompt_reduction="mean"``) and sums over pairs;
    * one global list (improved repository): ``prompt_mask=None`` and ``threshold=0.26`` (COCO 0.285),
      so that only similarities above the threshold count, summed over pairs and prompts.

    Args:
        sim_fg_bgtext: ``(N, L)`` similarity of each pair's foreground view with each background prompt.
        prompt_mask: optional ``(N, L)`` bool, which prompts apply to which pair (default: all).
        threshold: hinge on the raw similarity; terms with ``s <= threshold`` are dropped (count 0).
        prompt_reduction: ``"sum"`` (Eq. 10) or ``"mean"`` over the pair's prompts: the sum divided
            by the number of prompts that apply to the pair (``prompt_mask``), *whether or not they
            pass the threshold*; a pair without prompts contributes 0. With a threshold, a prompt
            below it therefore counts as a zero term, never shrinks the denominator, and the loss
            never grows when a similarity falls (the mean of the above-threshold terms alone would
            jump up when a small term leaves it).
        reduction: over pairs: ``"none"`` -> ``(N,)``, ``"mean"`` or ``"sum"``.
        eps: as `otm_loss`.
        similarity: as `otm_loss`.
        validate: as `otm_loss`.

    >>> sims = torch.tensor([[0.2, 0.5], [0.3, 0.1]])
    >>> cbs_loss(sims, threshold=0.26, reduction="none")
    tensor([0.6931, 0.3567])
    """
    sim_fg_bgtext = check_tensor("sim_fg_bgtext", sim_fg_bgtext)
    check_floating("sim_fg_bgtext", sim_fg_bgtext)
    check_rank("sim_fg_bgtext", sim_fg_bgtext, 2, "(N, L)")
    check_choice("prompt_reduction", prompt_reduction, ("sum", "mean"))
    check_reduction(reduction)
    check_bool("validate", validate)
    if threshold is not None:
        threshold = check_real("threshold", threshold)
    if prompt_mask is not None:
        check_tensor("prompt_mask", prompt_mask)
        if prompt_mask.shape != sim_fg_bgtext.shape:
            raise ValueError(
                f"expected prompt_mask of shape (N, L) = {tuple(sim_fg_bgtext.shape)} matching "
                f"sim_fg_bgtext, got {tuple(prompt_mask.shape)}"
            )
        if prompt_mask.dtype != torch.bool:
            raise TypeError(
                f"expected prompt_mask to have dtype torch.bool (which prompts apply to which pair), "
                f"got {prompt_mask.dtype}; convert a 0/1 mask with mask.bool() or mask == 1"
            )
        check_same_device(sim_fg_bgtext=sim_fg_bgtext, prompt_mask=prompt_mask)
    if validate:
        check_values([finite_check("sim_fg_bgtext", sim_fg_bgtext)])

    sim_fg_bgtext = sim_fg_bgtext.to(compute_dtype(sim_fg_bgtext.dtype))
    terms = -torch.log1p(-similarity_to_probability(sim_fg_bgtext, mode=similarity, eps=eps))
    keep = torch.ones_like(sim_fg_bgtext, dtype=torch.bool) if prompt_mask is None else prompt_mask
    counted = keep
    if threshold is not None:
        counted = keep & (sim_fg_bgtext > threshold)
    per_pair = torch.where(counted, terms, torch.zeros_like(terms)).sum(dim=1)
    if prompt_reduction == "mean":
        per_pair = per_pair / keep.sum(dim=1).clamp_min(1).to(per_pair.dtype)
    return reduce_loss(per_pair, reduction)


def reg_loss(
    cams: Tensor,
    labels: Tensor | None = None,
    *,
    positive_only: bool = False,
    reduction: str = "mean",
    validate: bool = True,
) -> Tensor:
    """Area regularisation, Eq. 12: the mean activation of each map.

    Args:
        cams: ``(B, K, h, w)`` activation maps in ``[0, 1]`` (up to a rounding tolerance of
            ``max(1e-6, torch.finfo(cams.dtype).eps)``), ``h, w >= 1``.
        labels: ``(B, K)`` multi-hot labels; needed only when ``positive_only``.
        positive_only: regularise only the maps of present classes (the paper and the official
            code regularise all ``B x K`` maps, which is the default).
        reduction: ``"none"`` -> ``(B, K)`` (absent classes are 0 when ``positive_only``);
            ``"mean"`` over the regularised maps; ``"sum"``.
        validate: check ``cams`` (finite, in ``[0, 1]``) and ``labels`` (0/1) in one host sync.

    >>> reg_loss(torch.full((2, 3, 4, 4), 0.25))
    tensor(0.2500)
    """
    cams = check_tensor("cams", cams)
    check_floating("cams", cams)
    check_rank("cams", cams, 4, "(B, K, h, w)")
    check_map_size("cams", cams)
    check_bool("positive_only", positive_only)
    check_bool("validate", validate)
    check_reduction(reduction)
    if labels is not None:
        check_tensor("labels", labels)
        if labels.shape != cams.shape[:2]:
            raise ValueError(
                f"expected labels of shape (B, K) = {tuple(cams.shape[:2])} matching cams "
                f"{tuple(cams.shape)}, got {tuple(labels.shape)}"
            )
        check_same_device(cams=cams, labels=labels)
    if validate:
        checks = [finite_check("cams", cams), unit_interval_check("cams", cams)]
        if labels is not None:
            checks.append(binary_check("labels", labels))
        check_values(checks)

    area = cams.to(compute_dtype(cams.dtype)).mean(dim=(2, 3))
    if not positive_only:
        return reduce_loss(area, reduction)
    if labels is None:
        raise ValueError("reg_loss(positive_only=True) needs labels of shape (B, K), got None")
    positive = labels.to(area.dtype)
    area = area * positive
    check_reduction(reduction)
    if reduction == "mean":
        return area.sum() / positive.sum().clamp_min(1)
    return reduce_loss(area, reduction)


@dataclass(frozen=True)
class LossWeights:
    """The weights ``alpha, beta, gamma, delta`` of Eq. 13 (defaults: the paper's 10, 25, 29.5, 1.15).

    Each weight must be a finite real number ``>= 0`` (stored as a float).

    >>> LossWeights(btm=0.0)
    LossWeights(otm=10.0, btm=0.0, cbs=29.5, reg=1.15)
    """

    otm: float = 10.0
    btm: float = 25.0
    cbs: float = 29.5
    reg: float = 1.15

    def __post_init__(self) -> None:
        # Every weight is a finite number >= 0: a NaN, inf or negative weight would make the loss NaN,
        # infinite or rewarded for the wrong thing, silently.
        for name in ("otm", "btm", "cbs", "reg"):
            object.__setattr__(
                self, name, check_real(f"LossWeights.{name}", getattr(self, name), minimum=0.0)
            )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def combine_losses(otm: Tensor, btm: Tensor, cbs: Tensor, reg: Tensor, weights: LossWeights) -> Tensor:
    """Eq. 13: ``alpha * L_OTM + beta * L_BTM + gamma * L_CBS + delta * L_REG``.

    >>> one = torch.tensor(1.0)
    >>> combine_losses(one, one, one, one, LossWeights(1.0, 2.0, 3.0, 4.0))
    tensor(10.)
    """
    if not isinstance(weights, LossWeights):
        raise TypeError(f"expected weights to be a LossWeights, got {type(weights).__name__}")
    return weights.otm * otm + weights.btm * btm + weights.cbs * cbs + weights.reg * reg
