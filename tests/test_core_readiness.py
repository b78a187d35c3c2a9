"""clip_readiness on a CLIP-like scorer whose judgement is set by hand, and on a tiny open_clip model.

The scorer sees colours: an image's embedding counts its red, green, blue, gray and black pixels. Class
prompts point at one of those directions. A healthy scorer points "red" at red; a broken one points "red"
at black (so the empty view, all black, scores above a red object) or "green" at the gray background (so
the object-removed view scores above the object).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_clip, tiny_tokenizer

import clims_loss as cl

CLASSES = ("red", "green", "blue")
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
DIRECTIONS = {"red": 0, "green": 1, "blue": 2, "gray": 3, "black": 4}
REGISTRY = cl.BackgroundPromptRegistry(
    name="colours", class_names=CLASSES, class_backgrounds={c: ("gray floor",) for c in CLASSES}
)
PROMPTS = [*REGISTRY.object_prompts(), *REGISTRY.background_prompts()]


class ColourScorer(torch.nn.Module):
    """``encode_image``: the share of red, green, blue, gray and black pixels (+0.01); ``encode_text``:
    the direction each prompt is given in ``meaning``."""

    def __init__(self, meaning: dict[str, str]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        meanings = {**{p: "gray" for p in REGISTRY.background_prompts()}, **meaning}
        self.table = torch.stack(
            [torch.nn.functional.one_hot(torch.tensor(DIRECTIONS[meanings[p]]), 5).float() for p in PROMPTS]
        )

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]

    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        r, g, b = views.unbind(1)
        shares = [
            (r > 0.6) & (g < 0.4) & (b < 0.4),
            (g > 0.6) & (r < 0.4) & (b < 0.4),
            (b > 0.6) & (r < 0.4) & (g < 0.4),
            (views - 0.5).abs().amax(1) < 0.15,
            views.amax(1) < 0.15,
        ]
        return torch.stack([s.float().mean(dim=(1, 2)) for s in shares], dim=1) + 0.01


def tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[PROMPTS.index(t)] for t in texts])


def healthy() -> dict[str, str]:
    return {p: c for p, c in zip(REGISTRY.object_prompts(), CLASSES, strict=True)}


def evaluator(meaning: dict[str, str]) -> cl.CLIPTextDrivenEvaluator:
    # Pixels in [0, 1] in and out: the views are raw pixels with black where the map is 0.
    unit = {
        "image_mean": cl.UNIT_MEAN,
        "image_std": cl.UNIT_STD,
        "clip_mean": cl.UNIT_MEAN,
        "clip_std": cl.UNIT_STD,
    }
    return cl.CLIPTextDrivenEvaluator(ColourScorer(meaning), tokenizer, REGISTRY, input_size=32, **unit)


def world(count: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gray images with one coloured square each (two on every fourth image); the CAMs are the squares."""
    images = torch.full((count, 3, 32, 32), 0.5)
    cams = torch.zeros(count, 3, 32, 32)
    labels = torch.zeros(count, 3)
    for i in range(count):
        for j, k in enumerate({i % 3, (i + 1) % 3} if i % 4 == 0 else {i % 3}):
            top, left = 2 + 14 * j, 3 + (5 * i) % 14
            images[i, :, top : top + 12, left : left + 12] = torch.tensor(COLOURS[CLASSES[k]]).view(3, 1, 1)
            cams[i, k, top : top + 12, left : left + 12] = 1.0
            labels[i, k] = 1.0
    return images, cams, labels


def test_a_healthy_clip_flags_nothing() -> None:
    report = cl.clip_readiness(evaluator(healthy()), *world())
    assert report.at_risk == []
    assert report.zero_shot_accuracy == 1.0
    for entry in report.classes:
        assert entry.scores["foreground"] > entry.scores["empty"]
        assert entry.scores["foreground"] > entry.scores["background"]
        assert entry.zero_shot == 1.0 and entry.removed_at_or_above == 0.0


def test_an_empty_view_scoring_above_the_object_is_flagged() -> None:
    report = cl.clip_readiness(evaluator({**healthy(), "a photo of red.": "black"}), *world())
    assert report.at_risk == ["red"]
    assert report["red"].flags == (cl.readiness.FLAG_EMPTY_VIEW,)
    assert report["red"].scores["empty"] >= report["red"].scores["foreground"]


def test_an_object_removed_view_scoring_above_the_object_is_flagged() -> None:
    report = cl.clip_readiness(evaluator({**healthy(), "a photo of green.": "gray"}), *world())
    assert cl.readiness.FLAG_OBJECT_REMOVED in report["green"].flags
    assert report["green"].removed_at_or_above == 1.0
    # "green" now matches every gray scene: the wording separates nothing, which shows on whole images.
    assert report.zero_shot_accuracy < 0.7
    assert cl.readiness.FLAG_ZERO_SHOT in report["red"].flags


def test_a_margin_flags_a_view_close_below_the_object() -> None:
    healthy_report = cl.clip_readiness(evaluator(healthy()), *world())
    gap = min(e.scores["foreground"] - e.scores["empty"] for e in healthy_report.classes)
    report = cl.clip_readiness(evaluator(healthy()), *world(), margin=gap + 1e-3)
    assert (
        cl.readiness.FLAG_EMPTY_VIEW
        in report[
            min(healthy_report.classes, key=lambda e: e.scores["foreground"] - e.scores["empty"]).name
        ].flags
    )


def test_the_foreground_score_is_the_one_the_evaluator_trains_with() -> None:
    torch.manual_seed(0)
    clip = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), "voc")
    images = torch.randn(4, 3, 40, 48)
    cams = torch.rand(4, 20, 10, 12)
    labels = torch.zeros(4, 20)
    labels[[0, 1, 2, 3, 3], [3, 3, 7, 3, 14]] = 1
    out = clip(images, cams, labels)
    report = cl.clip_readiness(clip, images, cams, labels, batch_size=3)
    boat = out.class_index == 3
    assert report["boat"].images == 3
    assert report["boat"].scores["foreground"] == pytest.approx(float(out.sim_fg_text[boat].mean()), abs=1e-5)
    assert report["boat"].scores["background"] == pytest.approx(float(out.sim_bg_text[boat].mean()), abs=1e-5)
    assert (
        report["cow"].images == 0
        and math.isnan(report["cow"].scores["foreground"])
        and not report["cow"].flags
    )
    # Batches of any split give the same report as the tensors.
    batches = [(images[:1], cams[:1], labels[:1]), (images[1:], cams[1:], labels[1:])]
    split = cl.clip_readiness(clip, batches=batches)
    for mine, theirs in zip(split.classes, report.classes, strict=True):
        assert mine.scores == pytest.approx(theirs.scores, abs=1e-5, nan_ok=True)
        assert (mine.images, mine.flags) == (theirs.images, theirs.flags)
    # JSON for machines (NaN as null), Markdown for people.
    data = json.loads(report.to_json())
    assert data["at_risk"] == report.at_risk and data["classes"][9]["scores"]["whole"] is None
    table = report.to_markdown()
    assert "| boat | 3 |" in table and "not measured (no image)" in table and "Classes at risk" in table


def test_check_against_compares_prediction_and_outcome() -> None:
    report = cl.clip_readiness(evaluator({**healthy(), "a photo of red.": "black"}), *world())
    assert report.check_against(["red", "blue"]) == {
        "predicted": ["red"],
        "missed": ["blue"],
        "false_flags": [],
    }
    assert report.check_against([]) == {"predicted": [], "missed": [], "false_flags": ["red"]}
    with pytest.raises(
        ValueError, match=r"expected collapsed to name classes of the report .* got \['cat'\]"
    ):
        report.check_against(["cat"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"margin": -1.0}, ValueError, "margin >= 0"),
        ({"min_separation": 2.0}, ValueError, "min_separation in [0, 1]"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_settings_are_checked(kwargs: dict[str, float], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        cl.clip_readiness(evaluator(healthy()), *world(), **kwargs)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_inputs_are_checked() -> None:
    clip = evaluator(healthy())
    images, cams, labels = world(4)
    with pytest.raises(TypeError, match="CLIPTextDrivenEvaluator"):
        cl.clip_readiness("clip", images, cams, labels)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"K = 3 classes of registry 'colours', got \(4, 2, 32, 32\)"):
        cl.clip_readiness(clip, images, cams[:, :2], labels[:, :2])
    with pytest.raises(ValueError, match=r"one row per image, got \(4, 3, 32, 32\), \(3, 3, 32, 32\)"):
        cl.clip_readiness(clip, images, cams[:3], labels)
    with pytest.raises(TypeError, match="either images, cams and labels, or batches"):
        cl.clip_readiness(clip, images, cams, labels, batches=[])
    with pytest.raises(ValueError, match="at least one image with at least one label"):
        cl.clip_readiness(clip, images, cams, labels * 0)
    with pytest.raises(ValueError, match="expected cams to lie in"):
        cl.clip_readiness(clip, images, cams * 3, labels)
