"""MS-COCO 2014 through the whole pipeline: a synthetic COCO directory (80 categories, a few drawn images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pipeline_helpers import FAST_SMOKE_ARGS, run_cli

STAGES = "train_cam,train_clims,make_cam,eval_cam"


def write_synthetic_coco(root: Path, images_per_split: dict[str, int], seed: int = 0) -> None:
    """COCO 2014 layout: <split>2014/COCO_<split>2014_<id>.jpg + annotations/instances_<split>2014.json, with
    one or two coloured rectangles per image (polygons), drawn from 4 of the 80 categories."""
    import clims_loss as cl

    rng = np.random.default_rng(seed)
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(cl.COCO_CLASSES)]
    colours = {1: (220, 30, 30), 3: (30, 200, 30), 17: (30, 30, 220), 18: (230, 230, 30)}
    (root / "annotations").mkdir(parents=True)
    next_annotation = 1
    for split, count in images_per_split.items():
        (root / f"{split}2014").mkdir()
        images, annotations = [], []
        for number in range(count):
            numeric_id = 1000 * (split == "val") + number + 1
            file_name = f"COCO_{split}2014_{numeric_id:012d}.jpg"
            canvas = Image.new("RGB", (64, 48), (120, 120, 120))
            draw = ImageDraw.Draw(canvas)
            for category in rng.choice(sorted(colours), size=int(rng.integers(1, 3)), replace=False):
                x0, y0 = int(rng.integers(0, 32)), int(rng.integers(0, 24))
                x1, y1 = x0 + int(rng.integers(10, 30)), y0 + int(rng.integers(10, 22))
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colours[int(category)])
                annotations.append(
                    {
                        "id": next_annotation,
                        "image_id": numeric_id,
                        "category_id": int(category),
                        "iscrowd": 0,
                        "area": float((x1 - x0) * (y1 - y0)),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    }
                )
                next_annotation += 1
            canvas.save(root / f"{split}2014" / file_name, quality=95)
            images.append({"id": numeric_id, "file_name": file_name, "width": 64, "height": 48})
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_pipeline_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    write_synthetic_coco(tmp_path / "coco", {"train": 16, "val": 4})
    workdir = tmp_path / "w"
    assert (
        run_cli(
            [
                "--dataset",
                "coco",
                "--coco-root",
                tmp_path / "coco",
                "--workdir",
                workdir,
                "--stages",
                STAGES,
                *FAST_SMOKE_ARGS,
                "--set",
                "data.crop_size=48",
            ]
        )
        == 0
    )
    results = json.loads((workdir / "results.json").read_text())["cam"]
    assert results["split"] == "val" and results["images"] == 4
    assert len(results["per_class"]) == 81
    assert len(list((workdir / "make_cam" / "train_clims").glob("*.npy"))) == 20
    assert len(list((workdir / "cache" / "coco_masks").glob("val-*/*.png"))) == 4
    clims_log = (workdir / "logs" / "train_clims.jsonl").read_text()
    assert '"prompts": "coco"' in clims_log


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_preflight_names_the_damaged_files(tmp_path: Path) -> None:
    """A COCO set with an annotation of a category the file does not list, an annotation whose image size
    is not its image's, a truncated image and a polygon that cannot be drawn: the preflight reports all four
    before training, each naming its file (and the value)."""
    pytest.importorskip("pycocotools")
    from clims_pipeline.data import COCOSource, DatasetError

    root = tmp_path / "coco"
    write_synthetic_coco(root, {"train": 5})
    annotation_file = root / "annotations" / "instances_train2014.json"
    data = json.loads(annotation_file.read_text())
    first, second, third, fourth = (info["id"] for info in data["images"][:4])
    next(a for a in data["annotations"] if a["image_id"] == first)["category_id"] = 999
    next(info for info in data["images"] if info["id"] == second)["width"] = 65
    next(a for a in data["annotations"] if a["image_id"] == fourth)["segmentation"] = [["x"]]
    annotation_file.write_text(json.dumps(data))
    truncated = root / "train2014" / f"COCO_train2014_{third:012d}.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])

    source = COCOSource(root, mask_cache_dir=tmp_path / "masks")
    with pytest.raises(DatasetError) as raised:
        source.validate("train", need_masks=True)
    message = str(raised.value)
    assert "found 4 problem(s)" in message and "nothing was trained" in message
    assert (
        f"annotation of image COCO_train2014_{first:012d} in {annotation_file} has category id 999"
    ) in message
    assert (
        f"image {root / 'train2014' / f'COCO_train2014_{second:012d}.jpg'} is 64x48 but {annotation_file} "
        "gives it 65x48"
    ) in message
    assert f"unreadable image: {truncated}" in message
    assert f"cannot draw the mask of COCO_train2014_{fourth:012d} from {annotation_file}" in message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_masks_follow_an_edited_annotation_file(tmp_path: Path) -> None:
    """The drawn masks are a cache of the annotation file: after the file is edited (another category for
    an annotation), a new source draws the mask anew instead of reading the old drawing."""
    pytest.importorskip("pycocotools")
    import os

    from clims_pipeline.data import COCOSource

    root = tmp_path / "coco"
    write_synthetic_coco(root, {"val": 2})
    annotation_file = root / "annotations" / "instances_val2014.json"
    first = COCOSource(root, mask_cache_dir=tmp_path / "masks")
    image_id = first.ids("val")[0]
    before = first.load_mask(image_id)
    data = json.loads(annotation_file.read_text())
    numeric_id = int(image_id.rsplit("_", 1)[-1])
    annotation = next(a for a in data["annotations"] if a["image_id"] == numeric_id and not a.get("iscrowd"))
    old_value = sorted(c["id"] for c in data["categories"]).index(annotation["category_id"]) + 1
    other = next(c["id"] for c in data["categories"] if c["id"] != annotation["category_id"])
    annotation["category_id"] = other
    annotation_file.write_text(json.dumps(data))
    os.utime(annotation_file, ns=(1, 1))  # an edit within the same mtime tick still changes the stamp
    after = COCOSource(root, mask_cache_dir=tmp_path / "masks").load_mask(image_id)
    new_value = sorted(c["id"] for c in data["categories"]).index(other) + 1
    assert (before == old_value).any() and (after != before).any()
    assert (after == new_value).sum() >= (before == old_value).sum() > 0
