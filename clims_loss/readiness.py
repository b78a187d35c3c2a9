"""``clip_readiness``: will this CLIP and these prompts train CLIMS, or let some class's maps collapse?

CLIMS trains the maps ``P_k`` so that CLIP matches the foreground view ``X * P_k`` with the class prompt
(OTM) and does not match the background view ``X * (1 - P_k)`` (BTM), nor the class's co-occurring
background prompts on the foreground view (CBS). Those terms are satisfied by a *degenerate* map when

* the **empty view** (what an all-zero map shows CLIP: the fill alone) scores at least as high for the
  class as the foreground view: OTM no longer prefers the object to nothing;
* the **object-removed view** scores at least as high for the class as the foreground view: BTM and CBS
  push the map away from the object, and nothing pulls it back.

A prompt wording the CLIP does not understand shows before either: the class prompts no longer separate
the classes on whole images. This function measures all three on the user's images, image-level labels
and baseline CAMs (no ground-truth masks), with the evaluator that CLIMS will train with, and flags each
class (docs/readiness.md). Whether a flagged class then does collapse is decided by
`clims_loss.detect_collapse`; `ReadinessReport.check_against` compares the two.

All scores are cosine similarities between L2-normalised CLIP embeddings, the quantity the CLIMS losses
take (before their clamp to ``[eps, 1 - eps]``, which keeps their order).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from clims_loss._validation import check_positive_int, check_real, check_strings, check_tensor
from clims_loss.evaluator import CLIPTextDrivenEvaluator
from clims_loss.masking import MaskedViews, masked_views

__all__ = [
    "DEFAULT_MIN_SEPARATION",
    "FLAG_EMPTY_VIEW",
    "FLAG_OBJECT_REMOVED",
    "FLAG_ZERO_SHOT",
    "VIEWS",
    "ClassReadiness",
    "ReadinessReport",
    "clip_readiness",
]

#: A class is flagged when it is among its images' top-n classes on fewer than this share of them.
DEFAULT_MIN_SEPARATION = 0.5
#: The flags, as written in the report.
FLAG_EMPTY_VIEW = "empty view >= object"
FLAG_OBJECT_REMOVED = "object removed >= object"
FLAG_ZERO_SHOT = "poor zero-shot separation"
#: The four views every class prompt is scored on.
VIEWS = ("whole", "foreground", "background", "empty")


@dataclass(frozen=True)
class ClassReadiness:
    """One class's measurements (NaN when the class has no image among those measured).

    Attributes:
        name: the class name.
        images: how many measured images contain the class.
        zero_shot: the share of those images on which the class is among the image's top-``n``
            classes (``n``: the image's number of labels), scored on the whole image.
        scores: view -> the class prompt's mean similarity with the view (`VIEWS`: the whole
            image, the baseline CAM's foreground view ``X * P``, its background view ``X * (1 - P)``,
            the empty view of an all-zero map).
        background_scores: view -> the mean similarity of the class's co-occurring background prompts
            with the view (empty when the class has none).
        background_terms: the class's co-occurring background terms (the CBS prompts).
        removed_at_or_above: the share of the class's (image, class) pairs whose background view scores
            at or above their foreground view.
        flags: the degenerate conditions found (`FLAG_EMPTY_VIEW`, `FLAG_OBJECT_REMOVED`,
            `FLAG_ZERO_SHOT`).
    """

    name: str
    images: int
    zero_shot: float
    scores: dict[str, float]
    background_scores: dict[str, float]
    background_terms: tuple[str, ...]
    removed_at_or_above: float
    flags: tuple[str, ...] = ()

    @property
    def at_risk(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class ReadinessReport:
    """What `clip_readiness` measured: one `ClassReadiness` per class, and the settings.

    ``zero_shot_accuracy`` is the mean over images of the share of an image's ``n`` labels among its
    top-``n`` classes.
    """

    classes: tuple[ClassReadiness, ...]
    images: int
    zero_shot_accuracy: float
    prompts: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.0
    min_separation: float = DEFAULT_MIN_SEPARATION

    @property
    def at_risk(self) -> list[str]:
        """The flagged classes, in class order: the ones predicted to collapse."""
        return [entry.name for entry in self.classes if entry.at_risk]

    def __getitem__(self, name: str) -> ClassReadiness:
        for entry in self.classes:
            if entry.name == name:
                return entry
        raise KeyError(f"unknown class {name!r}; the report's classes: {[c.name for c in self.classes]}")

    def check_against(self, collapsed: Sequence[str]) -> dict[str, list[str]]:
        """Compare the prediction with the classes that did collapse (e.g. `CollapseCheck.collapsed_classes`).

        Returns ``{"predicted": ..., "missed": ..., "false_flags": ...}``: flagged and collapsed, collapsed
        but not flagged, flagged but not collapsed.
        """
        names = check_strings("collapsed", collapsed)
        known = [entry.name for entry in self.classes]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"expected collapsed to name classes of the report {known}, got {unknown}")
        flagged = set(self.at_risk)
        return {
            "predicted": [n for n in known if n in flagged and n in names],
            "missed": [n for n in known if n in names and n not in flagged],
            "false_flags": [n for n in known if n in flagged and n not in names],
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at_risk": self.at_risk}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as JSON (NaN written as ``null``); written to ``path`` when given."""
        text = json.dumps(_nan_to_none(self.to_dict()), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as file:
                file.write(text + "\n")
        return text

    def to_markdown(self) -> str:
        """A table for people: one row per class, the flags last (see docs/readiness.md)."""
        wording = self.prompts.get("template", "")
        lines = [
            "| class | images | zero-shot | whole | foreground | object removed | empty | "
            "bg prompts: whole / fg / removed / empty | flags |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for entry in self.classes:
            s = entry.scores
            background = (
                " / ".join(_number(entry.background_scores[v]) for v in VIEWS)
                if entry.background_scores
                else "-"
            )
            flags = ", ".join(f"**{flag}**" for flag in entry.flags) or "ok"
            if entry.images == 0:
                flags = "not measured (no image)"
            lines.append(
                f"| {entry.name} | {entry.images} | {_percent(entry.zero_shot)} | {_number(s['whole'])} | "
                f"{_number(s['foreground'])} | {_number(s['background'])} | {_number(s['empty'])} | "
                f"{background} | {flags} |"
            )
        at_risk = ", ".join(self.at_risk) or "none"
        header = [
            f"Zero-shot accuracy on {self.images} images: {_percent(self.zero_shot_accuracy)} "
            f"(share of each image's n labels among its top-n classes); prompt template {wording!r}.",
            "",
            "Scores are the class prompt's cosine similarity with each view. A class is flagged when the "
            f"empty view or the object-removed view scores within {self.margin:g} of the foreground view or "
            "above it, "
            f"or when it is among its images' top-n classes on fewer than {_percent(self.min_separation)} "
            "of them.",
            "",
            f"**Classes at risk of collapse: {at_risk}**",
            "",
        ]
        return "\n".join(header + lines) + "\n"


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.0f} %"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


class _Sums:
    """Per-class running sums of the scores (float64, on the CPU)."""

    def __init__(self, num_classes: int) -> None:
        zeros = torch.zeros(num_classes, dtype=torch.float64)
        self.pairs = zeros.clone()
        self.zero_shot_hits = zeros.clone()
        self.removed_at_or_above = zeros.clone()
        self.scores = {view: zeros.clone() for view in VIEWS[:3]}
        self.background = {view: zeros.clone() for view in VIEWS[:3]}
        self.image_shares = 0.0
        self.images = 0

    def add(self, name: str, view: str, class_index: Tensor, values: Tensor) -> None:
        target = getattr(self, name)[view]
        target.index_add_(0, class_index.cpu(), values.detach().to("cpu", torch.float64))


def _batches(
    images: Tensor | None, cams: Tensor | None, labels: Tensor | None, batches: object, batch_size: int
) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    if batches is not None:
        if images is not None or cams is not None or labels is not None:
            raise TypeError("expected either images, cams and labels, or batches, got both")
        if not isinstance(batches, Iterable):
            raise TypeError(
                "expected batches to be an iterable of (images, cams, labels) tuples, "
                f"got {type(batches).__name__}"
            )
        return batches
    if images is None or cams is None or labels is None:
        raise TypeError("expected images, cams and labels (tensors), or batches=, got neither")
    images, cams, labels = (
        check_tensor("images", images),
        check_tensor("cams", cams),
        check_tensor("labels", labels),
    )
    if not images.shape[0] == cams.shape[0] == labels.shape[0]:
        raise ValueError(
            f"expected images, cams and labels with one row per image, got {tuple(images.shape)}, "
            f"{tuple(cams.shape)} and {tuple(labels.shape)}"
        )
    return zip(*(torch.split(t, batch_size) for t in (images, cams, labels)), strict=True)


@torch.no_grad()
def clip_readiness(
    evaluator: CLIPTextDrivenEvaluator,
    images: Tensor | None = None,
    cams: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]] | None = None,
    margin: float = 0.0,
    min_separation: float = DEFAULT_MIN_SEPARATION,
    batch_size: int = 32,
) -> ReadinessReport:
    """Measure, per class, whether CLIMS's terms can be satisfied by a degenerate map (module docs).

    Args:
        evaluator: the `CLIPTextDrivenEvaluator` CLIMS will train with (its CLIP, prompts, masking and
            normalisation are the ones measured).
        images: ``(M, 3, H, W)`` images, normalised as the evaluator expects (``image_mean``/``image_std``).
        cams: ``(M, K, h, w)`` baseline CAMs in ``[0, 1]`` (e.g. divided by their maximum); only the
            maps of each image's labelled classes are used.
        labels: ``(M, K)`` multi-hot image labels.
        batches: instead of the three tensors, an iterable of ``(images, cams, labels)`` batches
            (images of different sizes go in different batches).
        margin: flag a view scoring above ``foreground - margin`` (``>= 0``; ``0``: at or above).
        min_separation: flag a class among its images' top-``n`` classes on fewer than this share of
            them, in ``[0, 1]``.
        batch_size: images per batch when tensors are given (``>= 1``).

    Returns:
        A `ReadinessReport`; ``report.at_risk`` lists the classes predicted to collapse.
    """
    if not isinstance(evaluator, CLIPTextDrivenEvaluator):
        raise TypeError(f"expected evaluator to be a CLIPTextDrivenEvaluator, got {type(evaluator).__name__}")
    margin = check_real("margin", margin, minimum=0.0)
    min_separation = check_real("min_separation", min_separation, minimum=0.0)
    if min_separation > 1.0:
        raise ValueError(f"expected min_separation in [0, 1], got {min_separation!r}")
    batch_size = check_positive_int("batch_size", batch_size)
    registry = evaluator.prompts
    num_classes = registry.num_classes
    text = evaluator.text_embeddings  # (K, D)
    background_text = evaluator.background_embeddings  # (L, D)
    prompt_mask = evaluator.background_mask.to(text.dtype)  # (K, L)
    prompt_count = prompt_mask.sum(1)  # (K,)

    def views(images: Tensor, cams: Tensor, labels: Tensor) -> MaskedViews:
        """The fg/bg views of the positive pairs, exactly as the evaluator builds them in training."""
        return masked_views(
            images,
            cams,
            labels,
            size=evaluator.input_size,
            mode=registry.masking,
            image_mean=evaluator.image_mean,
            image_std=evaluator.image_std,
            clip_mean=evaluator.clip_mean,
            clip_std=evaluator.clip_std,
        )

    def encode(views: Tensor) -> Tensor:
        return torch.cat([evaluator.encode_views(chunk) for chunk in torch.split(views, batch_size)])

    def background_mean(features: Tensor, class_index: Tensor) -> Tensor:
        """Each row's mean similarity with its class's background prompts (0 where it has none)."""
        if background_text.shape[0] == 0:
            return features.new_zeros(features.shape[0])
        mask = prompt_mask[class_index]
        return (features @ background_text.T * mask).sum(1) / prompt_count[class_index].clamp_min(1)

    sums = _Sums(num_classes)
    empty_features: Tensor | None = None
    for index, batch in enumerate(_batches(images, cams, labels, batches, batch_size)):
        if not isinstance(batch, (tuple, list)) or len(batch) != 3:
            raise TypeError(
                f"expected batch {index} to be an (images, cams, labels) tuple, got {type(batch).__name__}"
            )
        batch_images, batch_cams, batch_labels = batch
        batch_cams = check_tensor("cams", batch_cams)
        if batch_cams.dim() == 4 and batch_cams.shape[1] != num_classes:
            raise ValueError(
                f"expected cams of shape (B, K, h, w) with K = {num_classes} classes of registry "
                f"{registry.name!r}, got {tuple(batch_cams.shape)}"
            )
        device = text.device
        batch_images, batch_cams = batch_images.to(device), batch_cams.to(device)
        batch_labels = check_tensor("labels", batch_labels).to(device)
        pairs = views(batch_images, batch_cams, batch_labels)  # checks the inputs
        count = batch_images.shape[0]
        whole_maps = batch_cams.new_ones(count, 1, 1, 1)
        whole = encode(views(batch_images, whole_maps, batch_labels.new_ones(count, 1)).fg)
        if empty_features is None:  # the fill alone: the same view whatever the image
            empty_view = views(batch_images[:1], whole_maps[:1] * 0, batch_labels.new_ones(1, 1))
            empty_features = encode(empty_view.fg)
        whole_scores = whole @ text.T  # (B, K)

        # Zero-shot: is each labelled class among its image's top-n classes (n = the image's labels)?
        positive = batch_labels > 0
        n_labels = positive.sum(1)
        rank = (whole_scores.unsqueeze(1) > whole_scores.unsqueeze(2)).sum(
            2
        )  # (B, K): classes scoring higher
        hits = positive & (rank < n_labels.unsqueeze(1))
        labelled = n_labels > 0
        sums.image_shares += float((hits.sum(1)[labelled] / n_labels[labelled]).sum())
        sums.images += int(labelled.sum())

        batch_index, class_index = pairs.batch_index, pairs.class_index
        if class_index.numel() == 0:
            continue
        features = encode(pairs.views)
        fg, bg = features[: pairs.num_pairs], features[pairs.num_pairs :]
        pair_text = text[class_index]
        fg_scores, bg_scores = (fg * pair_text).sum(1), (bg * pair_text).sum(1)
        ones = torch.ones_like(fg_scores)
        sums.pairs.index_add_(0, class_index.cpu(), ones.double().cpu())
        sums.zero_shot_hits.index_add_(0, class_index.cpu(), hits[batch_index, class_index].double().cpu())
        sums.removed_at_or_above.index_add_(0, class_index.cpu(), (bg_scores >= fg_scores).double().cpu())
        for view, view_scores, view_features in (
            ("whole", whole_scores[batch_index, class_index], whole[batch_index]),
            ("foreground", fg_scores, fg),
            ("background", bg_scores, bg),
        ):
            sums.add("scores", view, class_index, view_scores)
            sums.add("background", view, class_index, background_mean(view_features, class_index))

    if sums.images == 0 or empty_features is None:
        raise ValueError("expected at least one image with at least one label, got none")
    all_classes = torch.arange(num_classes, device=text.device)
    empty_scores = (empty_features @ text.T)[0].double().cpu()
    empty_background = background_mean(empty_features.expand(num_classes, -1), all_classes).double().cpu()

    entries = []
    for k, name in enumerate(registry.class_names):
        pairs_k = float(sums.pairs[k])

        def mean(total: Tensor, k: int = k, pairs_k: float = pairs_k) -> float:
            return float(total[k]) / pairs_k if pairs_k else math.nan

        scores = {view: mean(sums.scores[view]) for view in VIEWS[:3]}
        scores["empty"] = float(empty_scores[k]) if pairs_k else math.nan
        terms = registry.backgrounds_for(name)
        background: dict[str, float] = {}
        if terms:
            background = {view: mean(sums.background[view]) for view in VIEWS[:3]}
            background["empty"] = float(empty_background[k]) if pairs_k else math.nan
        zero_shot = mean(sums.zero_shot_hits)
        flags: list[str] = []
        if pairs_k:
            if scores["empty"] >= scores["foreground"] - margin:
                flags.append(FLAG_EMPTY_VIEW)
            if scores["background"] >= scores["foreground"] - margin:
                flags.append(FLAG_OBJECT_REMOVED)
            if zero_shot < min_separation:
                flags.append(FLAG_ZERO_SHOT)
        entries.append(
            ClassReadiness(
                name=name,
                images=int(pairs_k),
                zero_shot=zero_shot,
                scores=scores,
                background_scores=background,
                background_terms=tuple(terms),
                removed_at_or_above=mean(sums.removed_at_or_above),
                flags=tuple(flags),
            )
        )
    return ReadinessReport(
        classes=tuple(entries),
        images=sums.images,
        zero_shot_accuracy=sums.image_shares / sums.images,
        prompts={"name": registry.name, "template": registry.template, "masking": registry.masking},
        margin=margin,
        min_separation=min_separation,
    )
