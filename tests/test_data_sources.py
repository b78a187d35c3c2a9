"""Datasets of the pipeline: VOC layouts, raw-index masks, labels, transforms, COCO, malformed data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import make_mini_voc, require_voc_sample, run_cli

# isort: split
from clims_pipeline.data import COCOSource, DatasetError, TrainCropDataset, VOCSource, load_index_mask

TRAIN_ONLY = ["--stages", "train_cam", "--preset", "smoke", "--epochs-cam", "1"]


def test_labels_from_masks_match_the_reference_labels() -> None:
    sample = require_voc_sample()
    source = VOCSource(sample)
    reference = json.loads((sample / "cls_labels.json").read_text())
    for split in ("train", "val"):
        labels = source.labels(split, cache_dir=None)
        assert {k: [c + 1 for c in v] for k, v in labels.items()} == {k: reference[k] for k in labels}


def test_nested_vocdevkit_root_is_accepted(tmp_path: Path) -> None:
    root = make_mini_voc(tmp_path, train=2, val=1, nested=True)
    source = VOCSource(root)
    assert source.root == root / "VOCdevkit" / "VOC2012"
    assert len(source.ids("train")) == 2


def test_grayscale_and_palette_masks_give_the_same_indices(tmp_path: Path) -> None:
    sample = require_voc_sample()
    image_id = (sample / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    palette_path = sample / "SegmentationClass" / f"{image_id}.png"
    assert Image.open(palette_path).mode == "P"
    indices = load_index_mask(palette_path)
    grayscale_path = tmp_path / "gray.png"
    Image.fromarray(indices, mode="L").save(grayscale_path)
    np.testing.assert_array_equal(load_index_mask(grayscale_path), indices)
    assert {0, 255} <= set(np.unique(indices).tolist())  # background and the void border survive as indices
    rgb_path = tmp_path / "rgb.png"
    Image.open(palette_path).convert("RGB").save(rgb_path)
    with pytest.raises(DatasetError, match=r"rgb\.png"):
        load_index_mask(rgb_path)


def test_labels_fall_back_to_annotation_xml(tmp_path: Path) -> None:
    root = make_mini_voc(tmp_path, train=1, val=1)
    image_id = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (root / folder / f"{image_id}.png").unlink()
    (root / "Annotations").mkdir()
    (root / "Annotations" / f"{image_id}.xml").write_text(
        "<annotation><object><name>dog</name><part><name>head</name></part></object>"
        "<object><name>person</name></object><object><name>dog</name></object></annotation>"
    )
    source = VOCSource(root)
    source.validate("train", need_labels=True)
    assert source.compute_labels(image_id) == [11, 14]
    with pytest.raises(DatasetError, match=re.escape(f"{image_id}.png")):
        source.validate("train", need_masks=True)


def test_training_crops_are_deterministic_per_epoch_and_index() -> None:
    sample = require_voc_sample()
    source = VOCSource(sample)
    ids = source.ids("train")[:3]
    dataset = TrainCropDataset(
        source, ids, source.labels("train", None), resize_long=(40, 80), crop_size=32, seed=1
    )
    first = dataset[(0, 2)]
    assert first["image"].shape == (3, 32, 32) and first["label"].shape == (20,)
    assert float(first["label"].sum()) >= 1
    assert np.array_equal(first["image"].numpy(), dataset[(0, 2)]["image"].numpy())
    other_epochs = [dataset[(epoch, 2)]["image"].numpy() for epoch in range(1, 6)]
    assert any(not np.array_equal(first["image"].numpy(), other) for other in other_epochs)


def test_labels_are_cached_in_the_workdir(tmp_path: Path) -> None:
    root = make_mini_voc(tmp_path / "voc", train=8, val=1)
    assert (
        run_cli(
            [
                "--voc-root",
                root,
                "--workdir",
                tmp_path / "w",
                *TRAIN_ONLY,
                "--set",
                "train_cam.max_steps=1",
                "--set",
                "train_cam.batch_size=8",
                "--set",
                "data.crop_size=32",
            ]
        )
        == 0
    )
    cached = json.loads((tmp_path / "w" / "cache" / "labels_voc_train.json").read_text())
    assert cached["fingerprint"].endswith(str(root)) and len(cached["labels"]) == 8


# ------------------------------------------------------------------------------------------- malformed data


def _first_train_id(root: Path) -> str:
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]


def _break_list(root: Path) -> Path:
    path = root / "ImageSets" / "Segmentation" / "train.txt"
    path.unlink()
    return path


def _break_image(root: Path) -> Path:
    path = root / "JPEGImages" / f"{_first_train_id(root)}.jpg"
    path.unlink()
    return path


def _break_mask(root: Path) -> Path:
    image_id = _first_train_id(root)
    (root / "SegmentationClassAug" / f"{image_id}.png").unlink()
    path = root / "SegmentationClass" / f"{image_id}.png"
    path.unlink()
    return path


def _corrupt_image(root: Path) -> Path:
    path = root / "JPEGImages" / f"{_first_train_id(root)}.jpg"
    path.write_bytes(b"this is not a JPEG file")
    return path


def run_smoke(root: Path, workdir: Path, stages: str, *extra: str) -> int:
    return run_cli(["--voc-root", root, "--workdir", workdir, "--stages", stages, "--preset=smoke", *extra])


@pytest.mark.parametrize(
    "break_dataset",
    [_break_list, _break_image, _break_mask, _corrupt_image],
    ids=["missing-list", "missing-image", "missing-mask", "unreadable-image"],
)
def test_malformed_dataset_stops_before_training_naming_the_file(tmp_path: Path, break_dataset) -> None:
    root = make_mini_voc(tmp_path / "voc", train=8, val=1)
    broken = break_dataset(root)
    workdir = tmp_path / "w"
    with pytest.raises(DatasetError, match=re.escape(str(broken))):
        run_smoke(root, workdir, "train_cam,make_cam,eval_cam")
    assert not (workdir / "train_cam").exists()  # no training started


def test_missing_eval_mask_is_found_before_training(tmp_path: Path) -> None:
    root = make_mini_voc(tmp_path / "voc", train=8, val=1)
    val_id = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    (root / "SegmentationClassAug" / f"{val_id}.png").unlink()
    broken = root / "SegmentationClass" / f"{val_id}.png"
    broken.unlink()
    workdir = tmp_path / "w"
    with pytest.raises(DatasetError, match=re.escape(str(broken))):
        # The training split is intact: only eval_cam's preflight can see the gap, and it runs first.
        run_smoke(root, workdir, "train_cam,eval_cam", "--eval-split", "val")
    assert not (workdir / "train_cam").exists()


def test_missing_train_aug_list_says_what_to_do(tmp_path: Path) -> None:
    root = make_mini_voc(tmp_path / "voc", train=2, val=1)
    with pytest.raises(DatasetError, match=r"train_aug\.txt.*--train-split train"):
        run_cli(["--voc-root", root, "--workdir", tmp_path / "w", "--stages", "train_cam"])


def test_not_a_voc_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="JPEGImages"):
        VOCSource(tmp_path)


# ---------------------------------------------------------------------------------------------- COCO


def _write_tiny_coco(root: Path) -> None:
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    images, annotations = [], []
    for split, numeric_id in (("train", 9), ("val", 42)):
        file_name = f"COCO_{split}2014_{numeric_id:012d}.jpg"
        (root / f"{split}2014").mkdir(parents=True)
        Image.new("RGB", (20, 10), (90, 120, 30)).save(root / f"{split}2014" / file_name)
        images = [{"id": numeric_id, "file_name": file_name, "width": 20, "height": 10}]
        annotations = [
            {
                "id": 1,
                "image_id": numeric_id,
                "category_id": 3,
                "iscrowd": 0,
                "area": 50.0,
                "segmentation": [[0, 0, 10, 0, 10, 5, 0, 5]],
                "bbox": [0, 0, 10, 5],
            },
            {
                "id": 2,
                "image_id": numeric_id,
                "category_id": 18,
                "iscrowd": 0,
                "area": 4.0,
                "segmentation": [[2, 1, 4, 1, 4, 3, 2, 3]],
                "bbox": [2, 1, 2, 2],
            },
        ]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_labels_and_semantic_masks(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    _write_tiny_coco(tmp_path / "coco")
    source = COCOSource(tmp_path / "coco", mask_cache_dir=tmp_path / "masks")
    assert source.class_names == ("person", "car", "dog")
    val_id = source.ids("val")[0]
    assert val_id == "COCO_val2014_000000000042"
    source.validate("val", need_masks=True)
    assert source.compute_labels(val_id) == [1, 2]  # car, dog (0-based over the 3 categories)
    mask = source.load_mask(val_id)
    assert mask.shape == (10, 20)
    assert mask[0, 8] == 2 and mask[2, 3] == 3 and mask[8, 15] == 0  # car, dog painted over car, background
    assert source.load_image(val_id).size == (20, 10)
    with pytest.raises(DatasetError, match=r"instances_val2014\.json"):
        (tmp_path / "coco" / "annotations" / "instances_val2014.json").unlink()
        COCOSource(tmp_path / "coco", mask_cache_dir=tmp_path / "masks2").ids("val")


def test_label_cache_follows_edited_masks_and_force(tmp_path: Path) -> None:
    import json
    import os

    root = make_mini_voc(tmp_path / "voc", train=3, val=1)
    cache = tmp_path / "cache"
    source = VOCSource(root)
    image_id = source.ids("train")[0]
    labels = source.labels("train", cache)
    assert labels == source.labels("train", None)  # cached and derived labels agree
    mask_path = source.mask_path(image_id)
    mask = Image.open(mask_path)
    array = np.array(mask)
    array[:6, :6] = 3  # paint a boat (class index 2) into the corner
    edited = Image.fromarray(array, mode="P")
    edited.putpalette(mask.getpalette() or [])
    edited.save(mask_path)
    status = mask_path.stat()
    os.utime(mask_path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000))  # even on a coarse clock
    assert 2 in source.labels("train", cache)[image_id] and 2 not in labels[image_id]
    # --force derives again even what the cache's rule takes for unchanged (here: a tampered cache file).
    cache_file = cache / "labels_voc_train.json"
    stored = json.loads(cache_file.read_text())
    stored["entries"][image_id][1] = [19]
    cache_file.write_text(json.dumps(stored))
    assert source.labels("train", cache)[image_id] == [19]
    assert 2 in source.labels("train", cache, force=True)[image_id]
    assert 2 in source.labels("train", cache)[image_id]  # and the cache holds the derived labels again
