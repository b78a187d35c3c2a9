"""mine_backgrounds on a fake CLIP whose similarities are set by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_clip, tiny_tokenizer

import clims_loss as cl

DIM = 32
FILLERS = [f"filler{i}" for i in range(20)]
VOCABULARY = ["water", "ship", "sky", "grass", "road", *FILLERS]


def _basis(i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), DIM).float()


TEXT = {
    "a photo of boat.": _basis(0),
    "a photo of cow.": _basis(1),
    "a photo of water.": _basis(2),
    # A synonym of the object: its text is close to "boat", and boat images match it strongly.
    "a photo of ship.": 0.95 * _basis(0) + 0.31 * _basis(2),
    "a photo of sky.": _basis(3),
    "a photo of grass.": _basis(4),
    "a photo of road.": _basis(5),
    **{f"a photo of {name}.": _basis(6 + i) for i, name in enumerate(FILLERS)},
}
PROMPTS = list(TEXT)


class FakeClip(torch.nn.Module):
    """Text embeddings from the table above; an image's embedding is stored in its first pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.table = torch.stack([TEXT[p] for p in PROMPTS])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :DIM]


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[PROMPTS.index(t)] for t in texts])


def _world(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Boats on water under the sky, cows on grass under the sky, and some road scenes."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = [], []
    for i in range(60):
        kind = i % 3
        vector = 0.3 * torch.rand(DIM, generator=generator) * (torch.arange(DIM) >= 6)
        vector = vector + _basis(3)  # the sky is everywhere
        if kind == 0:
            vector = vector + _basis(0) + _basis(2)
            labels.append([1.0, 0.0])
        elif kind == 1:
            vector = vector + _basis(1) + _basis(4)
            labels.append([0.0, 1.0])
        else:
            vector = vector + _basis(5)
            labels.append([0.0, 0.0])
        features.append(vector)
    images = torch.zeros(60, 3, 8, 8)
    images.view(60, -1)[:, :DIM] = torch.stack(features)
    return images, torch.tensor(labels)


REGISTRY = cl.BackgroundPromptRegistry(name="fake", class_names=("boat", "cow"))


def test_cooccurring_term_wins_synonym_excluded_common_term_low() -> None:
    images, labels = _world()
    mined, scores = cl.mine_backgrounds(
        FakeClip(), fake_tokenizer, images, labels, REGISTRY, VOCABULARY, top_l=3
    )
    assert mined.backgrounds_for("boat")[0] == "water"
    assert mined.backgrounds_for("cow")[0] == "grass"
    assert "ship" not in mined.backgrounds_for("boat")
    ship = next(s for s in scores["boat"] if s.term == "ship")
    assert ship.presence > 0.5 and ship.objectness > 2.0  # seen with boats, but it *is* the boat
    sky = next(s for s in scores["boat"] if s.term == "sky")
    water = next(s for s in scores["boat"] if s.term == "water")
    assert sky.score < 0.1 * water.score and "sky" not in mined.backgrounds_for("boat")
    assert mined.background_scores["boat"][0] == pytest.approx(water.score, abs=1e-5)
    assert mined.global_backgrounds == () and mined.name == "fake-mined"


def test_margin_and_batches_and_json_round_trip() -> None:
    images, labels = _world()
    strict, _ = cl.mine_backgrounds(
        FakeClip(), fake_tokenizer, list(images.split(7)), labels, REGISTRY, VOCABULARY, margin=0.5
    )
    assert strict.backgrounds_for("boat") == ("water",) and strict.backgrounds_for("cow") == ("grass",)
    assert cl.BackgroundPromptRegistry.from_json(strict.to_json()) == strict


def test_mined_registry_drives_the_evaluator() -> None:
    clip, tokenizer = make_tiny_clip(), tiny_tokenizer()
    registry = cl.BackgroundPromptRegistry(name="toy", class_names=("boat", "cow", "train"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=generator)
    labels = torch.zeros(12, 3)
    labels[torch.arange(12), torch.arange(12) % 3] = 1.0
    mined, scores = cl.mine_backgrounds(clip, tokenizer, images, labels, registry, margin=-1.0, top_l=2)
    assert all(len(mined.backgrounds_for(name)) == 2 for name in registry.class_names)
    assert len(scores["boat"]) == len(cl.DEFAULT_BACKGROUND_VOCABULARY)
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tokenizer, mined)
    cams = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = evaluator(torch.randn(2, 3, 32, 32), cams, labels[:2])
    out.loss.backward()
    assert torch.isfinite(out.cbs)


def test_mining_errors() -> None:
    images, labels = _world()
    with pytest.raises(ValueError, match=r"labels of shape \(M, K\) with K = 2 classes of registry 'fake'"):
        cl.mine_backgrounds(FakeClip(), fake_tokenizer, images, torch.zeros(60, 3), REGISTRY, VOCABULARY)
    with pytest.raises(ValueError, match=r"as many images as labels rows \(59\), got 60"):
        cl.mine_backgrounds(FakeClip(), fake_tokenizer, images, labels[:59], REGISTRY, VOCABULARY)
    with pytest.raises(ValueError, match=r"labels to contain only 0 and 1"):
        cl.mine_backgrounds(FakeClip(), fake_tokenizer, images, labels * 2, REGISTRY, VOCABULARY)
    with pytest.raises(ValueError, match=r"non-empty vocabulary"):
        cl.mine_backgrounds(FakeClip(), fake_tokenizer, images, labels, REGISTRY, [])
    with pytest.raises(ValueError, match=r"one score per background term"):
        REGISTRY.replace(class_backgrounds={"boat": ("water",)}, background_scores={"boat": (1.0, 2.0)})


def test_default_vocabulary_is_stuff_terms() -> None:
    vocabulary = cl.DEFAULT_BACKGROUND_VOCABULARY
    assert 100 <= len(vocabulary) <= 200 and len(set(vocabulary)) == len(vocabulary)
    for term in ("sky", "water", "river", "sea", "railroad", "grass", "road", "snow", "wall", "floor"):
        assert term in vocabulary


def test_mining_scores_in_eval_mode_and_restores_the_mode() -> None:
    """A CLIP with BatchNorm must be scored with its running statistics, and left as it was."""
    import open_clip

    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": (1, 1, 1, 1), "width": 8},  # ModifiedResNet: BatchNorm
        text_cfg={"context_length": 16, "width": 32, "heads": 2, "layers": 1},
    ).train()
    before = {k: v.clone() for k, v in clip.state_dict().items() if "running" in k}
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    registry = cl.BackgroundPromptRegistry(name="t", class_names=("boat", "train"))
    _, in_train_mode = cl.mine_backgrounds(clip, tiny_tokenizer(), images, labels, registry, ["water", "sky"])
    assert clip.training
    for key, value in clip.state_dict().items():
        if key in before:
            torch.testing.assert_close(value, before[key])
    clip.eval()
    _, in_eval_mode = cl.mine_backgrounds(clip, tiny_tokenizer(), images, labels, registry, ["water", "sky"])
    assert not clip.training
    assert [s.score for s in in_train_mode["boat"]] == pytest.approx([s.score for s in in_eval_mode["boat"]])
