"""Toy world generator and tiny CLIP training: determinism, exact masks, layout, checkpoint round trip."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clims_loss as cl
from clims_pipeline import clip_training
from clims_pipeline.toy import clip as toy_clip
from clims_pipeline.toy import world as toyworld

SMALL = dict(
    n_train=24, n_val=8, n_background_only=12, n_background_only_val=12, image_size=64, progress=False
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP spinning makes them 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "world"
    toyworld.generate_toy_world(root, seed=3, **SMALL)
    return root


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "toyworld.json"
    }


def train_tiny_clip(samples: list, out_path: Path, **settings: Any) -> clip_training.ClipTrainingResult:
    return clip_training.train_clip(
        samples, model_name=toy_clip.TOY_CLIP_CONFIG, out_path=out_path, progress=False, **settings
    )


def test_generator_is_deterministic_by_seed(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    toyworld.generate_toy_world(again, seed=3, **SMALL)
    assert _file_bytes(world) == _file_bytes(again)
    other = tmp_path / "other"
    toyworld.generate_toy_world(other, seed=4, **SMALL)
    assert _file_bytes(other)["captions.jsonl"] != _file_bytes(world)["captions.jsonl"]


def test_worker_count_does_not_change_the_world(world: Path, tmp_path: Path) -> None:
    parallel = tmp_path / "parallel"
    toyworld.generate_toy_world(parallel, seed=3, num_workers=2, **SMALL)
    assert _file_bytes(world) == _file_bytes(parallel)


def test_masks_match_labels_exactly(world: Path) -> None:
    labels = json.loads((world / "cls_labels.json").read_text())
    classes = len(toyworld.TOY_CLASSES)
    for sample_id, listed in labels.items():
        mask_image = Image.open(world / "SegmentationClass" / f"{sample_id}.png")
        assert mask_image.mode == "P"
        mask = np.array(mask_image)
        aug = np.array(Image.open(world / "SegmentationClassAug" / f"{sample_id}.png"))
        np.testing.assert_array_equal(mask, aug)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(classes + 1)) | {255}
        assert listed == sorted(v for v in values if 1 <= v <= classes)
        assert listed == sorted(listed) and all(isinstance(v, int) for v in listed)
        if sample_id.startswith("bg"):
            assert listed == [] and values == {0}
        else:
            assert listed, f"object image {sample_id} has no visible object"


def test_layout_is_readable_and_splits_are_consistent(world: Path) -> None:
    metadata = toyworld.load_toy_world(world)
    train_aug, train, val = _ids(world, "train_aug"), _ids(world, "train"), _ids(world, "val")
    assert len(train_aug) == SMALL["n_train"] and len(val) == SMALL["n_val"]
    assert set(train) <= set(train_aug) and not set(train_aug) & set(val)
    assert _ids(world, "trainval") == train + val
    assert metadata["image_ext"] == ".jpg" and metadata["classes"] == list(toyworld.TOY_CLASSES)
    for sample_id in train_aug + val + _ids(world, "background_only_val"):
        image = Image.open(world / "JPEGImages" / f"{sample_id}.jpg")
        assert image.mode == "RGB" and image.size == (SMALL["image_size"], SMALL["image_size"])
        assert Image.open(world / "SegmentationClass" / f"{sample_id}.png").size == image.size


def test_captions_are_well_formed(world: Path) -> None:
    records = toyworld.read_captions(world)
    labels = json.loads((world / "cls_labels.json").read_text())
    assert {r["id"] for r in records} == set(labels)
    words = {name: re.compile(rf"\b({name}|{toyworld._PLURALS[name]})\b") for name in toyworld.TOY_CLASSES}
    for record in records:
        caption = record["caption"]
        assert caption and caption.endswith(".") and caption == caption.strip()
        named = {name for name, pattern in words.items() if pattern.search(caption)}
        assert named == {toyworld.TOY_CLASSES[i - 1] for i in record["labels"]}, caption
        if not record["labels"]:  # background-only: captioned with its background
            terms = {t for b in record["backgrounds"] for t in toyworld.BACKGROUND_TERMS[b]}
            assert any(re.search(rf"\b{t}\b", caption) for t in terms), caption


def test_co_occurrence_rate_is_at_least_85_percent(tmp_path: Path) -> None:
    metadata = toyworld.generate_toy_world(
        tmp_path / "stats",
        n_train=600,
        n_val=0,
        n_background_only=0,
        n_background_only_val=0,
        seed=0,
        progress=False,
    )
    stats = metadata["statistics"]
    assert stats["min_instance_context_rate"] >= 0.85, stats["instance_context_rate"]
    assert stats["min_image_context_rate"] >= 0.85, stats["image_context_rate"]
    # ... but not 100%: off-context objects exist, as in real photos.
    assert max(stats["instance_context_rate"].values()) < 1.0
    assert set(stats["objects_per_image"]) == {1, 2, 3}


def test_prompts_and_background_helpers(world: Path) -> None:
    prompts = toyworld.toy_prompts()
    assert prompts["class_names"] == list(toyworld.TOY_CLASSES)
    assert (
        prompts["class_backgrounds"]["boat"][0] == "water" and "sea" in prompts["class_backgrounds"]["boat"]
    )
    json.dumps(prompts)  # plain data
    found = list(toyworld.background_only_images(world))
    assert found and all(b in toyworld.TOY_BACKGROUNDS and p.exists() for _, b, p in found)
    water = toyworld.render_background_only("water", 3, image_size=64, seed=1)
    assert water.shape == (3, 64, 64, 3) and water.dtype == np.uint8
    np.testing.assert_array_equal(water, toyworld.render_background_only("water", 3, image_size=64, seed=1))
    with pytest.raises(ValueError, match="background"):
        toyworld.render_background_only("lava", 1)


def test_void_border_and_png_option(tmp_path: Path) -> None:
    toyworld.generate_toy_world(
        tmp_path / "png",
        n_train=6,
        n_val=0,
        n_background_only=0,
        n_background_only_val=0,
        image_format="png",
        void_border=1,
        seed=0,
        progress=False,
    )
    ids = _ids(tmp_path / "png", "train_aug")
    assert (tmp_path / "png" / "JPEGImages" / f"{ids[0]}.png").exists()
    assert any(255 in np.array(Image.open(tmp_path / "png" / "SegmentationClass" / f"{i}.png")) for i in ids)


def test_invalid_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_format"):
        toyworld.generate_toy_world(tmp_path, n_train=1, image_format="gif", progress=False)
    with pytest.raises(ValueError, match="image_size"):
        toyworld.generate_toy_world(tmp_path, n_train=1, image_size=8, progress=False)


def test_train_clip_checkpoint_loads_back_with_identical_outputs(world: Path, tmp_path: Path) -> None:
    samples = toy_clip.toy_world_samples(world)
    out_path = tmp_path / "tiny.pt"
    result = train_tiny_clip(
        samples,
        out_path,
        epochs=1,
        max_steps=3,
        batch_size=8,
        lr=1e-3,
        seed=0,
    )
    assert out_path.exists() and result.history["epochs"][0]["step"] == 3
    loaded = open_clip.create_model(toy_clip.TOY_CLIP_CONFIG, pretrained=str(out_path))
    loaded.eval()
    fresh = open_clip.create_model(toy_clip.TOY_CLIP_CONFIG)
    fresh.eval()
    tokenizer = open_clip.get_tokenizer(toy_clip.TOY_CLIP_CONFIG)
    images = torch.randn(2, 3, 64, 64)
    texts = tokenizer(["a photo of boat.", "a photo of water."])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images), result.model.encode_image(images), rtol=0, atol=0
        )
        torch.testing.assert_close(loaded.encode_text(texts), result.model.encode_text(texts), rtol=0, atol=0)
        assert not torch.allclose(fresh.encode_text(texts), loaded.encode_text(texts))
    # The library's evaluator loads the same file with the toy world's prompts, and its loss is finite.
    registry = cl.BackgroundPromptRegistry(**toyworld.toy_prompts())
    assert registry.backgrounds_for("boat")[0] == "water"
    evaluator = cl.CLIPTextDrivenEvaluator.from_pretrained(
        toy_clip.TOY_CLIP_CONFIG,
        pretrained=out_path,
        prompts=registry,
        image_mean=cl.UNIT_MEAN,  # the images below are raw pixels in [0, 1]
        image_std=cl.UNIT_STD,
    )
    labels = torch.zeros(2, len(toyworld.TOY_CLASSES))
    labels[0, 1] = labels[1, 3] = 1
    cams = torch.rand(2, len(toyworld.TOY_CLASSES), 16, 16, requires_grad=True)
    loss = evaluator(torch.rand(2, 3, 64, 64), cams, labels).loss
    loss.backward()
    assert torch.isfinite(loss) and cams.grad is not None
    # The report runs on the checkpoint (values are meaningless after 3 steps, but well-defined).
    report = toy_clip.zero_shot_report(world, pretrained=out_path, batch_size=16)
    assert 0.0 <= report["top1_in_labels_all"] <= 1.0
    assert set(report["per_class"]) == set(toyworld.TOY_CLASSES)
    assert "ratio" in toy_clip.format_report(report)


def test_label_captions_for_voc_layout(world: Path) -> None:
    samples = clip_training.label_caption_samples(world, "train", list(toyworld.TOY_CLASSES))
    assert len(samples) == len(_ids(world, "train"))
    assert all(caption.startswith("a photo of ") for _, caption in samples)
    assert clip_training.label_caption(["person", "car", "dog"]) == "a photo of person, car and dog."
    with pytest.raises(ValueError, match="class name"):
        clip_training.label_caption([])


def test_soft_masks_keep_about_the_requested_area() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = clip_training.random_soft_masks(64, 32, (0.5, 0.5), generator, torch.device("cpu"))
    assert masks.shape == (64, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    assert abs(masks.mean().item() - 0.5) < 0.1


def test_train_clip_resumes_instead_of_repeating(world: Path, tmp_path: Path) -> None:
    samples = toy_clip.toy_world_samples(world)
    settings = dict(epochs=2, batch_size=8, lr=1e-3, seed=0, out_path=tmp_path / "c.pt", progress=False)
    first = clip_training.train_clip(samples, model_name=toy_clip.TOY_CLIP_CONFIG, **settings)
    assert Path(str(settings["out_path"]) + ".resume").exists()
    again = clip_training.train_clip(
        samples, model_name=toy_clip.TOY_CLIP_CONFIG, **settings
    )  # complete: loads the state, trains nothing
    assert again.history["epochs"] == first.history["epochs"]
    texts = open_clip.get_tokenizer(toy_clip.TOY_CLIP_CONFIG)(["a photo of cow."])
    with torch.no_grad():
        torch.testing.assert_close(
            again.model.encode_text(texts), first.model.encode_text(texts), rtol=0, atol=0
        )


def test_toy_clip_corpus_adds_cutouts_and_backgrounds_and_masks_only_safe_samples(world: Path) -> None:
    default_samples, default_maskable, default_darken = toy_clip.toy_clip_corpus(world)  # "captions"
    assert all(default_maskable) and not any(default_darken)
    assert default_samples == toy_clip.toy_world_samples(world)
    samples, maskable, darken = toy_clip.toy_clip_corpus(
        world, object_cutouts=6, extra_backgrounds=7, mask_scenes=False
    )
    assert not any(darken)
    scenes = len(toyworld.read_captions(world, ["train_aug"]))
    backgrounds = len(toyworld.read_captions(world, ["background_only_train"]))
    assert len(samples) == len(maskable) == scenes + backgrounds + 6 + 7
    # The world's scenes come first and stay unmasked; everything whose caption survives a mask is maskable.
    assert not any(maskable[:scenes]) and all(maskable[scenes:])
    cutouts = np.stack([image for image, _ in samples[scenes + backgrounds : scenes + backgrounds + 6]])
    captions = [caption for _, caption in samples[scenes + backgrounds : scenes + backgrounds + 6]]
    assert (cutouts.max(axis=-1) == 0).mean() > 0.4  # mostly black around the objects
    assert all(any(name in caption for name in toyworld.TOY_CLASSES) for caption in captions)
    assert not any(
        term in caption
        for caption in captions
        for terms in toyworld.BACKGROUND_TERMS.values()
        for term in terms
    )
    with pytest.raises(ValueError, match="toy CLIP corpus"):
        toy_clip.toy_corpus_settings("webb")
    with pytest.raises(ValueError, match="one maskable flag per sample"):
        train_tiny_clip(samples, world / "x.pt", maskable=maskable[:-1])


def test_web_dark_corpus_masks_only_cutouts_and_adds_dark_scene_copies(world: Path) -> None:
    settings = toy_clip.toy_corpus_settings("web_dark")
    samples, maskable, darken = toy_clip.toy_clip_corpus(
        world,
        object_cutouts=5,
        extra_backgrounds=4,
        mask_scenes=settings["mask_scenes"],
        mask_backgrounds=settings["mask_backgrounds"],
        dark_copies=9,
    )
    scene_records = toyworld.read_captions(world, ["train_aug"])
    scenes = len(scene_records)
    backgrounds = len(toyworld.read_captions(world, ["background_only_train"]))
    assert len(samples) == len(maskable) == len(darken) == scenes + backgrounds + 5 + 4 + 9
    cutouts = slice(scenes + backgrounds, scenes + backgrounds + 5)
    assert [i for i, m in enumerate(maskable) if m] == list(range(cutouts.start, cutouts.stop))
    assert [i for i, d in enumerate(darken) if d] == list(range(len(samples) - 9, len(samples)))
    scene_images = {str(path) for path, _ in samples[:scenes]}
    for image, caption in samples[-9:]:  # copies of the world's scenes, captioned as dark pictures
        assert str(image) in scene_images and caption in toy_clip.DARK_CAPTIONS
    with pytest.raises(ValueError, match="one darken flag per sample"):
        train_tiny_clip(samples, world / "x.pt", darken=darken[:-1])


def test_darkening_scales_only_the_flagged_images_within_the_range() -> None:
    pixels = torch.rand(64, 3, 8, 8) * 0.5 + 0.5
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    augment = clip_training.Augment(mask_prob=0.0, flip_prob=0.0, dark_range=(1e-3, 0.1))
    darken = torch.arange(64) % 2 == 0
    unmaskable = torch.zeros(64, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    out = clip_training._augment(pixels, augment, generator, unmaskable, mean, std, darken)
    torch.testing.assert_close(out[~darken], pixels[~darken])
    factor = (out[darken] / pixels[darken]).flatten(1)
    torch.testing.assert_close(factor.amin(dim=1), factor.amax(dim=1))  # one factor per image
    assert factor.min() >= 1e-3 * (1 - 1e-5) and factor.max() <= 0.1 * (1 + 1e-5)
    assert factor.max() / factor.min() > 5  # drawn, not constant
    with pytest.raises(ValueError, match="dark_range"):
        bad = clip_training.Augment(dark_range=(0.0, 0.1))
        clip_training._augment(pixels, bad, torch.Generator(), darken, mean, std, darken)


def test_pixel_space_masking_fills_black_and_leaves_unmaskable_images_alone() -> None:
    """The evaluator masks pixels by default (masked-out parts are black): CLIP trains on the same."""
    pixels = torch.rand(4, 3, 16, 16)
    mean, std = (
        torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1),
        torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1),
    )
    augment = clip_training.Augment(mask_prob=1.0, keep=(0.3, 0.3), flip_prob=0.0, space="pixel")
    maskable = torch.tensor([True, True, False, False])
    out = clip_training._augment(pixels, augment, torch.Generator().manual_seed(0), maskable, mean, std)
    torch.testing.assert_close(out[2:], (pixels[2:] - mean) / std)
    recovered = out[:2] * std + mean  # back to pixels: the kept part is the image, the rest goes to 0
    ratio = recovered / pixels[:2]
    assert ratio.min() >= -1e-5 and ratio.max() <= 1 + 1e-5
    assert (ratio.amax(dim=1) < 0.01).float().mean() > 0.4  # about 70 % masked out, to black


def test_fixed_logit_scale_stays_fixed(world: Path, tmp_path: Path) -> None:
    samples = toy_clip.toy_world_samples(world)
    result = train_tiny_clip(
        samples, tmp_path / "t.pt", epochs=1, max_steps=2, batch_size=8, fixed_logit_scale=100.0
    )
    assert result.model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    assert result.history["meta"]["fixed_logit_scale"] == 100.0
    with pytest.raises(ValueError, match="fixed_logit_scale"):
        clip_training.train_clip(
            samples,
            model_name=toy_clip.TOY_CLIP_CONFIG,
            out_path=tmp_path / "u.pt",
            progress=False,
            fixed_logit_scale=1000.0,
        )


def test_a_regenerated_world_changes_the_source_fingerprint(tmp_path: Path) -> None:
    """Trained outputs and cached labels follow the world: another world in the same place is new data."""
    from clims_pipeline.toy.plugin import ToySource

    root = tmp_path / "world"
    toyworld.generate_toy_world(root, seed=1, **SMALL)
    first = ToySource(root).fingerprint()
    assert ToySource(root).fingerprint() == first
    toyworld.generate_toy_world(root, seed=2, overwrite=True, **SMALL)
    assert ToySource(root).fingerprint() != first
