"""Datasets: PASCAL VOC 2012 (+ SBD ``SegmentationClassAug``) and MS-COCO 2014, their checks and transforms.

A :class:`SegmentationSource` knows where a dataset's files are: split lists, images, semantic masks (raw
class
indices, ``0`` background, ``255`` void, whatever the PNG mode) and image-level labels. The torch datasets
below
turn a source into training crops or full-resolution inference images.

Class indices: a source has ``K`` foreground classes. Image-level labels are ``K``-way multi-hot vectors over
the
foreground classes (index ``k`` is mask value ``k + 1``); masks keep ``0`` for background.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
import xml.etree.ElementTree as ElementTree
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from clims_loss import IMAGENET_MEAN, IMAGENET_STD, BackgroundPromptRegistry

from .files import StampedCache, atomic_write, file_stamp, save_png
from .plugins import load_plugins

VOID_LABEL = 255

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class DatasetError(RuntimeError):
    """A dataset file is missing or unreadable; the message names the file."""


def open_image_checked(path: Path, what: str) -> Image.Image:
    """Open an image lazily, turning every failure into a :class:`DatasetError` that names the file."""
    if not path.is_file():
        raise DatasetError(f"missing {what}: {path}")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"unreadable {what}: {path} ({error})") from error


def decode_image(path: Path) -> tuple[int, int]:
    """Decode an image's pixel data (a truncated or corrupt file fails here, not in training); its size."""
    with open_image_checked(path, "image") as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise DatasetError(f"unreadable image: {path} ({error})") from error
        return int(image.size[0]), int(image.size[1])


def load_rgb(path: Path) -> Image.Image:
    image = open_image_checked(path, "image")
    try:
        return image.convert("RGB")
    except OSError as error:  # truncated or corrupt pixel data shows up only when decoding
        raise DatasetError(f"unreadable image: {path} ({error})") from error


def load_index_mask(path: Path) -> np.ndarray:
    """A semantic mask as raw indices (H, W) uint8: palette (``P``) and grayscale (``L``) PNGs alike.

    Converting a palette PNG to RGB or L would map indices to colours, so the pixel data is read untouched.
    """
    mask = open_image_checked(path, "mask")
    if mask.mode not in ("P", "L"):
        raise DatasetError(f"expected a palette (P) or grayscale (L) mask, got mode {mask.mode}: {path}")
    try:
        return np.array(mask, dtype=np.uint8)
    except OSError as error:
        raise DatasetError(f"unreadable mask: {path} ({error})") from error


def labels_from_mask(mask: np.ndarray, num_classes: int) -> list[int]:
    """0-based foreground class indices present in a mask (values 1..K; 0 and 255 ignored)."""
    values = np.unique(mask)
    return [int(v) - 1 for v in values if 1 <= v <= num_classes]


def multi_hot(class_indices: Sequence[int], num_classes: int) -> np.ndarray:
    vector = np.zeros(num_classes, dtype=np.float32)
    vector[list(class_indices)] = 1.0
    return vector


#: (kind, message): the message names the file, the value (for masks) and the list it came from.
Problem = tuple[str, str]

#: How many problems of each kind the error message shows (all of them go to the problems file).
SHOWN_PER_KIND = 10


def duplicate_problems(image_ids: Sequence[str], list_file: str) -> list[Problem]:
    lines: dict[str, list[int]] = {}
    for line, image_id in enumerate(image_ids, start=1):
        lines.setdefault(image_id, []).append(line)
    return [
        (
            "duplicate id",
            f"id {image_id!r} is listed {len(where)} times in {list_file} (entries "
            f"{', '.join(map(str, where))}): it would be trained and evaluated {len(where)} times; remove "
            "the repeated lines",
        )
        for image_id, where in lines.items()
        if len(where) > 1
    ]


def format_problems(problems: Sequence[Problem], limit: int | None = SHOWN_PER_KIND) -> str:
    """Problems grouped by kind (in order of first appearance) with counts; ``limit`` of each kind shown."""
    groups: dict[str, list[str]] = {}
    for kind, message in problems:
        groups.setdefault(kind, []).append(message)
    lines: list[str] = []
    for kind, messages in groups.items():
        lines.append(f"{kind}: {len(messages)}")
        shown = messages if limit is None else messages[:limit]
        lines += [f"  - {message}" for message in shown]
        if len(shown) < len(messages):
            lines.append(f"  ... and {len(messages) - len(shown)} more")
    return "\n".join(lines)


def raise_problems(
    problems: Sequence[Problem], problems_file: Path | None = None, also: BaseException | None = None
) -> None:
    """Raise one :class:`DatasetError` reporting every problem (grouped); write the full list to
    ``problems_file`` when given (and remove a stale one when there are no problems)."""
    if not problems:
        if problems_file is not None:
            problems_file.unlink(missing_ok=True)
        return
    where = ""
    if problems_file is not None:
        full = f"{len(problems)} problems found by the preflight\n\n{format_problems(problems, None)}\n"
        atomic_write(problems_file, lambda file: file.write(full.encode("utf-8")))
        where = f"\nthe full list is in {problems_file}"
    if also is not None:
        where += f"\nthe preflight also stopped on: {also}"
    raise DatasetError(
        f"the preflight found {len(problems)} problem(s) in the data; nothing was trained. Fix or remove "
        f"these files (or their lines in the list) and rerun:\n{format_problems(problems)}{where}"
    ) from also


# ------------------------------------------------------------------------------------------------------
# class sets
#
# A data set declares its classes in a class file: a registry JSON (``clims_loss.BackgroundPromptRegistry``:
# its class names, template, backgrounds and loss recipe) or a plain list, one class a line, optionally
# ``name: prompt words`` ("boat: a boat" labels the images "boat" and writes "a boat" into the prompts).
# The order is the label order: class ``k`` (0-based) is mask value ``k + 1``.

#: The file names a data root may hold its class file under (the first one present is used).
CLASS_FILE_NAMES = ("classes.json", "classes.txt")


@dataclass(frozen=True)
class ClassSet:
    """A data set's classes as its labels write them (``names``), as its prompts write them
    (``prompt_words``), and the registry they came from when the class file is a registry JSON."""

    names: tuple[str, ...]
    prompt_words: tuple[str, ...]
    path: Path
    registry: BackgroundPromptRegistry | None = None

    def digest(self) -> str:
        """Identifies the class set (names, words, the registry) in caches and fingerprints."""
        text = json.dumps(
            [self.names, self.prompt_words, self.registry.to_dict() if self.registry else None],
            sort_keys=True,
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def prompt_registry(self, recipe: BackgroundPromptRegistry) -> BackgroundPromptRegistry:
        """The registry of the class set: the class file's own when it is a registry JSON; for a plain list,
        ``recipe``'s template and loss settings with the class set's prompt words and no backgrounds (they
        are the data set's: mine them or write them, docs/own-data.md), so with a CBS weight of 0."""
        if self.registry is not None:
            return self.registry
        return recipe.replace(
            name=self.path.parent.name or self.path.stem,
            weights=dataclasses.replace(recipe.weights, cbs=0.0),
            class_names=self.prompt_words,
            class_backgrounds={},
            global_backgrounds=(),
            class_weights={},
            background_scores={},
        )


def read_class_file(path: str | Path) -> ClassSet:
    """A :class:`ClassSet` from a registry JSON (``.json``) or a plain class list; errors name the file and
    the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"missing class file: {path} (a registry JSON or a class list, one class a line)")
    if path.suffix == ".json":
        try:
            registry = BackgroundPromptRegistry.from_json(path)
        except (ValueError, KeyError, TypeError) as error:
            raise DatasetError(f"class file {path} is not a valid registry JSON: {error}") from error
        return ClassSet(registry.class_names, registry.class_names, path, registry)
    names: list[str] = []
    words: list[str] = []
    lines: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, prompt = (part.strip() for part in line.partition(":"))
        where = f"class file {path} line {number}"
        if not name or (colon and not prompt):
            raise DatasetError(f"{where}: expected 'name' or 'name: prompt words', got {raw!r}")
        if ";" in name:
            raise DatasetError(f"{where}: a class name cannot hold ';' (it separates labels), got {name!r}")
        if name in lines:
            raise DatasetError(f"{where}: class {name!r} is listed twice (first on line {lines[name]})")
        lines[name] = number
        names.append(name)
        words.append(prompt or name)
    if not names:
        raise DatasetError(f"class file {path} lists no classes")
    return ClassSet(tuple(names), tuple(words), path)


def find_class_file(root: Path) -> Path | None:
    """The class file a data root holds (:data:`CLASS_FILE_NAMES`), if any."""
    return next((root / name for name in CLASS_FILE_NAMES if (root / name).is_file()), None)


class SegmentationSource(ABC):
    """Where one dataset's files are. Subclasses: :class:`VOCSource`, :class:`COCOSource`."""

    name: str
    class_names: tuple[str, ...]
    #: The class file the classes came from (``declare_classes``), or None for the data set's built-in ones.
    class_set: ClassSet | None = None

    def declare_classes(self, class_set: ClassSet) -> None:
        """Use the classes of a class file instead of the data set's built-in ones."""
        self.class_set = class_set
        self.class_names = class_set.names

    def has_masks(self, split: str) -> bool:
        """Whether the split's images have semantic masks (evaluation is skipped without them)."""
        return True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def ids(self, split: str) -> list[str]:
        """Image ids of a split, in list order; raises :class:`DatasetError` naming a missing list file."""

    @abstractmethod
    def image_path(self, image_id: str) -> Path: ...

    @abstractmethod
    def mask_path(self, image_id: str) -> Path:
        """The semantic mask of an image (it may not exist; validation reports it)."""

    @abstractmethod
    def compute_labels(self, image_id: str) -> list[int]:
        """0-based foreground classes of one image, from its annotation."""

    def fingerprint(self) -> str:
        """Identifies the data on disk for caches (a changed root or class set invalidates cached labels)."""
        own = f":classes={self.class_set.digest()}" if self.class_set is not None else ""
        return f"{self.name}:{self.root}{own}"

    root: Path

    def load_image(self, image_id: str) -> Image.Image:
        return load_rgb(self.image_path(image_id))

    def load_mask(self, image_id: str) -> np.ndarray:
        return load_index_mask(self.mask_path(image_id))

    def list_file(self, split: str) -> str:
        """Where a split's ids are listed (named in preflight errors)."""
        return f"split {split!r} of {self.name}"

    def label_file(self, image_id: str, need_masks: bool, need_labels: bool) -> Path | None:
        """The file the checks read for an image's mask (``need_masks``) or image-level labels
        (``need_labels``): its mask unless a subclass says otherwise; None when neither is needed."""
        return self.mask_path(image_id) if need_masks or need_labels else None

    def preflight_files(self, image_id: str, need_masks: bool, need_labels: bool) -> list[Path]:
        """The files the preflight of one image reads (their size and mtime key its cache)."""
        label_file = self.label_file(image_id, need_masks, need_labels)
        return [self.image_path(image_id), *([label_file] if label_file is not None else [])]

    def check_item(self, image_id: str, need_masks: bool, need_labels: bool) -> list[tuple[str, str]]:
        """Read one image (decoded, not only its header) and its mask or label source; return its problems
        as ``(kind, message)`` pairs, each message naming the file (and the value, for masks)."""
        problems: list[tuple[str, str]] = []
        image_path = self.image_path(image_id)
        size: tuple[int, int] | None = None
        if not image_path.is_file():
            problems.append(("missing image", f"missing image: {image_path}"))
        else:
            try:
                size = decode_image(image_path)
            except DatasetError as error:
                problems.append(("unreadable image", str(error)))
        label_file = self.label_file(image_id, need_masks, need_labels)
        if label_file is not None:
            problems += self.check_label_file(label_file, size)
        return problems

    def check_label_file(self, path: Path, image_size: tuple[int, int] | None) -> list[tuple[str, str]]:
        """Decode a mask; check its values (0..K, 255 void) and that its size is its image's."""
        if not path.is_file():
            return [("missing mask", f"missing mask: {path}")]
        try:
            mask = load_index_mask(path)
        except DatasetError as error:
            return [("unreadable mask", str(error))]
        problems: list[tuple[str, str]] = []
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = [value for value in range(self.num_classes + 1, VOID_LABEL) if counts[value]]
        if bad:
            shown = ", ".join(str(value) for value in bad[:5]) + (" ..." if len(bad) > 5 else "")
            problems.append(
                (
                    "mask value out of range",
                    f"mask {path} holds value {shown} ({int(counts[bad].sum())} pixels); expected "
                    f"0..{self.num_classes} (background and the {self.num_classes} classes) or void "
                    f"{VOID_LABEL}",
                )
            )
        height, width = mask.shape
        if image_size is not None and (width, height) != image_size:
            problems.append(
                (
                    "mask size differs from image",
                    f"mask {path} is {width}x{height} but its image is {image_size[0]}x{image_size[1]}",
                )
            )
        return problems

    def validate(self, split: str, need_masks: bool = False, need_labels: bool = False) -> list[str]:
        """Check a split's list, every image (decoded) and its masks (``need_masks``) or whatever its
        image-level labels come from (``need_labels``); return its ids, or raise a :class:`DatasetError`
        listing every problem. The pipeline's preflight is the same check with a cache, over the ranks
        (:func:`check_split`)."""
        image_ids, problems = check_split(self, split, need_masks, need_labels)
        raise_problems(problems)
        return image_ids

    def check_mask(self, image_id: str) -> None:
        with open_image_checked(self.mask_path(image_id), "mask"):
            pass

    def check_label_source(self, image_id: str) -> None:
        """Image-level labels come from the mask unless a subclass says otherwise."""
        self.check_mask(image_id)

    def label_files(self, image_id: str) -> list[Path]:
        """The files an image's labels are derived from (their size and mtime key the label cache)."""
        label_file = self.label_file(image_id, need_masks=False, need_labels=True)
        return [label_file] if label_file is not None else []

    def labels(self, split: str, cache_dir: Path | None, force: bool = False) -> dict[str, list[int]]:
        """Image-level labels of a split, derived once and cached as JSON in ``cache_dir``.

        The cache follows the rule of every cache here (:class:`clims_pipeline.files.StampedCache`): an
        image's entry holds while its mask (or annotation) keeps its size and mtime and the class list is the
        same, so an edited mask gets new labels; ``force`` (``--force``) derives every label again.
        """
        cache = StampedCache(
            cache_dir / f"labels_{self.name}_{split}.json" if cache_dir is not None else None,
            self.class_names,
            context={"source": self.fingerprint()},
            force=force,
        )
        labels: dict[str, list[int]] = {}
        derived = 0
        for image_id in self.ids(split):
            stamps = cache.stamps(self.label_files(image_id))
            value = cache.get(image_id, stamps)
            if not isinstance(value, list):
                value = self.compute_labels(image_id)
                cache.put(image_id, stamps, value)
                derived += 1
            labels[image_id] = [int(v) for v in value]
        if derived or force:
            cache.save(fingerprint=self.fingerprint(), class_names=list(self.class_names), labels=labels)
        return labels


def resolve_voc_root(path: str | Path) -> Path:
    """Accept ``VOCdevkit``, ``VOCdevkit/VOC2012`` or any directory that directly holds ``JPEGImages``."""
    given = Path(path).expanduser()
    for candidate in (given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(
        f"no VOC 2012 layout under {given}: expected {given / 'JPEGImages'} "
        f"(or VOC2012/JPEGImages, VOCdevkit/VOC2012/JPEGImages)"
    )


class VOCSource(SegmentationSource):
    """PASCAL VOC 2012 with the SBD-augmented masks.

    Masks: ``SegmentationClass/<id>.png`` when present (the official annotation of the 2,913 VOC images),
    otherwise ``SegmentationClassAug/<id>.png`` (the SBD-derived masks of ``train_aug``). Labels come from the
    mask, or from ``Annotations/<id>.xml`` for an image without a mask.
    """

    name = "voc"
    class_names: tuple[str, ...] = VOC_CLASSES

    def __init__(self, root: str | Path):
        self.root = resolve_voc_root(root)

    def list_path(self, split: str) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def ids(self, split: str) -> list[str]:
        list_path = self.list_path(split)
        if not list_path.is_file():
            hint = (
                (
                    " (train_aug.txt is the 10,582-image SBD list; pass --train-split train to train on "
                    "the 1,464 "
                    "VOC images instead)"
                )
                if split == "train_aug"
                else ""
            )
            raise DatasetError(f"missing split list: {list_path}{hint}")
        # Some lists carry "<id> <mask path>" pairs; the id is always the first field.
        return [line.split()[0] for line in list_path.read_text().splitlines() if line.strip()]

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        official = self.root / "SegmentationClass" / f"{image_id}.png"
        if official.is_file():
            return official
        augmented = self.root / "SegmentationClassAug" / f"{image_id}.png"
        return augmented if augmented.is_file() or not official.parent.is_dir() else official

    def check_label_source(self, image_id: str) -> None:
        if (
            not self.mask_path(image_id).is_file()
            and (self.root / "Annotations" / f"{image_id}.xml").is_file()
        ):
            return
        self.check_mask(image_id)

    def list_file(self, split: str) -> str:
        return str(self.list_path(split))

    def label_file(self, image_id: str, need_masks: bool, need_labels: bool) -> Path | None:
        mask_path = self.mask_path(image_id)
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        if not need_masks and need_labels and not mask_path.is_file() and xml_path.is_file():
            return xml_path
        return super().label_file(image_id, need_masks, need_labels)

    def check_label_file(self, path: Path, image_size: tuple[int, int] | None) -> list[tuple[str, str]]:
        if path.suffix == ".xml":
            try:
                self._labels_from_xml(path)
            except DatasetError as error:
                return [("unreadable annotation", str(error))]
            return []
        return super().check_label_file(path, image_size)

    def compute_labels(self, image_id: str) -> list[int]:
        mask_path = self.mask_path(image_id)
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        if not mask_path.is_file() and xml_path.is_file():
            return self._labels_from_xml(xml_path)
        return labels_from_mask(self.load_mask(image_id), self.num_classes)

    def _labels_from_xml(self, xml_path: Path) -> list[int]:
        try:
            names = {
                node.text.strip()
                for node in ElementTree.parse(xml_path).getroot().iter("name")
                if node.text is not None
            }
        except ElementTree.ParseError as error:
            raise DatasetError(f"unreadable annotation: {xml_path} ({error})") from error
        # <name> also tags body parts (head, hand, foot) inside <part>; keep only class names.
        return sorted(self.class_names.index(name) for name in names if name in self.class_names)


class COCOSource(SegmentationSource):
    """MS-COCO 2014 through pycocotools: ``<root>/{train2014,val2014}/`` and
    ``<root>/annotations/instances_{train,val}2014.json``; splits ``train`` and ``val``.

    Semantic masks are rendered once from the instance polygons/RLEs into ``mask_cache_dir`` (1..80 in the
    order
    of category ids, larger instances painted first so that small ones stay visible, crowd regions void).
    """

    name = "coco"

    def __init__(self, root: str | Path, mask_cache_dir: Path):
        try:
            from pycocotools.coco import COCO  # noqa: F401
        except ImportError as error:
            raise ImportError("--dataset coco needs pycocotools: pip install pycocotools") from error
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"missing COCO root directory: {self.root}")
        self.mask_cache_dir = mask_cache_dir
        self._apis: dict[str, Any] = {}
        self._id_to_split: dict[str, str] = {}
        self._class_names: tuple[str, ...] | None = None
        self._category_ids: list[int] = []

    def annotation_path(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}2014.json"

    def _api(self, split: str) -> Any:
        if split not in ("train", "val"):
            raise DatasetError(f"COCO 2014 has splits 'train' and 'val', got {split!r}")
        if split not in self._apis:
            from pycocotools.coco import COCO

            path = self.annotation_path(split)
            if not path.is_file():
                raise DatasetError(f"missing split list: {path}")
            api = COCO(str(path))
            self._apis[split] = api
            categories = sorted(api.loadCats(api.getCatIds()), key=lambda c: c["id"])
            self._category_ids = [c["id"] for c in categories]
            self._class_names = tuple(c["name"] for c in categories)
            for info in api.dataset["images"]:
                self._id_to_split[Path(info["file_name"]).stem] = split
        return self._apis[split]

    # mypy rejects a read-only property over the base's writable attribute; nothing assigns COCO's names.
    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._class_names is None:
            for split in ("train", "val"):
                if self.annotation_path(split).is_file():
                    self._api(split)
                    break
            else:
                raise DatasetError(f"missing split list: {self.annotation_path('train')}")
        assert self._class_names is not None
        return self._class_names

    def ids(self, split: str) -> list[str]:
        api = self._api(split)
        return sorted(Path(info["file_name"]).stem for info in api.dataset["images"])

    def _split_of(self, image_id: str) -> str:
        if image_id not in self._id_to_split:
            for split in ("train", "val"):
                if split not in self._apis and self.annotation_path(split).is_file():
                    self._api(split)
        if image_id not in self._id_to_split:
            raise DatasetError(f"image id {image_id!r} is in no loaded COCO annotation file")
        return self._id_to_split[image_id]

    def image_path(self, image_id: str) -> Path:
        return self.root / f"{self._split_of(image_id)}2014" / f"{image_id}.jpg"

    def _annotations(self, image_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        api = self._api(self._split_of(image_id))
        numeric_id = int(image_id.rsplit("_", 1)[-1])
        return api.imgs[numeric_id], api.loadAnns(api.getAnnIds(imgIds=numeric_id))

    def mask_path(self, image_id: str) -> Path:
        split = self._split_of(image_id)
        # Keyed by the annotation file's size and mtime (the rule of every cache here): masks drawn from an
        # edited annotation file are drawn anew, not read from the old file's cache.
        stamp = file_stamp(self.annotation_path(split))
        key = f"{split}-{stamp[0]}-{stamp[1]}" if stamp is not None else split
        path = self.mask_cache_dir / key / f"{image_id}.png"
        if not path.is_file():
            save_png(path, Image.fromarray(self._render_mask(image_id), mode="L"))
        return path

    def _render_mask(self, image_id: str) -> np.ndarray:
        api = self._api(self._split_of(image_id))
        info, annotations = self._annotations(image_id)
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        for annotation in sorted(annotations, key=lambda a: -a.get("area", 0.0)):
            pixels = api.annToMask(annotation).astype(bool)
            value = (
                VOID_LABEL
                if annotation.get("iscrowd", 0)
                else self._category_ids.index(annotation["category_id"]) + 1
            )
            mask[pixels] = value
        return mask

    def check_mask(self, image_id: str) -> None:
        """Masks are rendered from the annotation file on first use; checking would render all of them."""
        self._annotations(image_id)

    def list_file(self, split: str) -> str:
        return str(self.annotation_path(split))

    def label_file(self, image_id: str, need_masks: bool, need_labels: bool) -> Path | None:
        """Masks and labels come from the annotation file (checked by ``check_item``), not a mask file."""
        return None

    def preflight_files(self, image_id: str, need_masks: bool, need_labels: bool) -> list[Path]:
        return [self.image_path(image_id), self.annotation_path(self._split_of(image_id))]

    def label_files(self, image_id: str) -> list[Path]:
        return [self.annotation_path(self._split_of(image_id))]

    def check_item(self, image_id: str, need_masks: bool, need_labels: bool) -> list[tuple[str, str]]:
        """The image decoded; with masks or labels, its annotations: categories the file lists, the image
        size it records equal to the image's, and (masks) the mask drawn, as training will draw it."""
        problems = super().check_item(image_id, need_masks, need_labels)
        if not (need_masks or need_labels):
            return problems
        try:
            info, annotations = self._annotations(image_id)
        except (DatasetError, KeyError, ValueError) as error:
            return [*problems, ("unreadable annotation", f"no annotation for {image_id!r} ({error})")]
        annotation_file = self.annotation_path(self._split_of(image_id))
        unknown = sorted({a.get("category_id") for a in annotations} - set(self._category_ids), key=str)
        if unknown:
            problems.append(
                (
                    "unknown category",
                    f"annotation of image {image_id} in {annotation_file} has category id "
                    f"{', '.join(map(str, unknown))}, not one of the {self.num_classes} categories it lists",
                )
            )
        image_path = self.image_path(image_id)
        if not problems:  # the image decoded (super), so its header is readable
            with open_image_checked(image_path, "image") as image:
                width, height = image.size
            if (info.get("width"), info.get("height")) != (width, height):
                problems.append(
                    (
                        "annotation size differs from image",
                        f"image {image_path} is {width}x{height} but {annotation_file} gives it "
                        f"{info.get('width')}x{info.get('height')}",
                    )
                )
        if need_masks and not problems:
            try:
                self.mask_path(image_id)  # drawn once and cached: training reads the drawn mask
            except Exception as error:  # pycocotools raises TypeError, ValueError, IndexError, ...
                problems.append(
                    (
                        "unreadable annotation",
                        f"cannot draw the mask of {image_id} from {annotation_file} "
                        f"({type(error).__name__}: {error})",
                    )
                )
        return problems

    def check_label_source(self, image_id: str) -> None:
        self._annotations(image_id)

    def compute_labels(self, image_id: str) -> list[int]:
        _, annotations = self._annotations(image_id)
        return sorted(
            {self._category_ids.index(a["category_id"]) for a in annotations if not a.get("iscrowd", 0)}
        )


# ------------------------------------------------------------------------------------------------------
# the preflight
#
# The preflight: every image and mask a run will read is read once, before any training.
#
# For each split a stage needs, every image is decoded (not only its header), every mask is decoded and its
# values checked against the data set's classes (``0..K``, ``255`` void) and its size against its image's, and
# ids listed twice are found. Problems are not raised one at a time: the run collects all of them (over every
# split and stage) and stops with one report, grouped by kind with counts and the first ten of each kind; the
# full list goes to ``<workdir>/preflight/problems.txt``. Every message names the file, the value and the
# list.
#
# A passed image is cached (``<workdir>/cache/preflight_<source>_<mode>.json``) by the one rule every cache of
# the pipeline follows (:class:`clims_pipeline.files.StampedCache`: each file's size and mtime_ns, plus the
# class list), so a second run only stats the files. Under ``torchrun`` rank ``r`` reads ``ids[r::world]``
# and the problems are gathered, so no rank alone outlasts the process-group timeout.


def check_mode(need_masks: bool, need_labels: bool) -> str:
    return "masks" if need_masks else "labels" if need_labels else "images"


def cache_path(cache_dir: Path, source: SegmentationSource, need_masks: bool, need_labels: bool) -> Path:
    return cache_dir / f"preflight_{source.name}_{check_mode(need_masks, need_labels)}.json"


def check_split(
    source: SegmentationSource,
    split: str,
    need_masks: bool = False,
    need_labels: bool = False,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[list[str], list[Problem]]:
    """The ids of a split and every problem of its images and masks (or label sources); see the module.

    A missing or empty list raises :class:`DatasetError` at once (there is nothing else to check). With
    ``gather`` (``all_gather_objects``) every rank checks its share and every rank gets all problems.
    """
    started = time.perf_counter()
    image_ids = source.ids(split)
    list_file = source.list_file(split)
    if not image_ids:
        raise DatasetError(f"split {split!r} of {source.name} lists no images ({list_file})")
    problems = duplicate_problems(image_ids, list_file)
    cache = StampedCache(
        cache_path(cache_dir, source, need_masks, need_labels) if cache_dir is not None else None,
        source.class_names,
        context={"source": source.fingerprint(), "mode": check_mode(need_masks, need_labels)},
        force=force,
    )
    passed: dict[str, list[Any]] = {}
    found: list[Problem] = []
    read = 0
    for image_id in list(dict.fromkeys(image_ids))[rank::world_size]:
        stamps = cache.stamps(source.preflight_files(image_id, need_masks, need_labels))
        if cache.get(image_id, stamps) is True:
            continue
        read += 1
        item_problems = source.check_item(image_id, need_masks, need_labels)
        if item_problems:
            found += [(kind, f"{message} (listed in {list_file})") for kind, message in item_problems]
        else:
            passed[image_id] = stamps
    shares = gather((passed, found, read)) if gather is not None else [(passed, found, read)]
    read = 0
    for share_passed, share_found, share_read in shares:
        for image_id, stamps in share_passed.items():
            cache.put(image_id, stamps, True)
        problems += share_found
        read += share_read
    if rank == 0 and any(share[0] for share in shares):
        cache.save()
    if say is not None:
        unique = len(set(image_ids))
        say(
            f"[preflight] {list_file}: {len(image_ids)} ids ({check_mode(need_masks, need_labels)}), "
            f"{read} read, {unique - read} unchanged since a passed check, {len(problems)} problems, "
            f"{time.perf_counter() - started:.1f} s over {world_size} process(es)"
        )
    return image_ids, problems


@dataclass(frozen=True)
class DataSourceSpec:
    """A data set the pipeline can run on, as registered with :func:`register_data_source`.

    ``build(root, cache_dir)`` opens it; its source declares the class set (``class_names``), or a class
    file does (``class_file``);
    ``prompt_presets`` names the ``clims_loss.BackgroundPromptRegistry`` preset of each variant ("paper",
    "official"); ``train_split`` / ``eval_split`` are its default lists. A source that can make its own data
    (``prepare``) may run without a root: ``default_root(workdir)`` says where it goes, and the command line
    falls back to it (``fallback``) when no data set is named, with its ``default_preset``,
    ``default_stages`` and ``default_workdir``.
    """

    name: str
    build: Callable[[Path, Path], SegmentationSource]
    root_help: str
    prompt_presets: dict[str, str]
    train_split: str = "train_aug"
    eval_split: str = "train"
    default_preset: str = "full"
    # Whether the data set may declare its classes with a class file (``data.classes`` or the root's
    # classes.json / classes.txt): "optional" (VOC layout), "required" (the simple layout) or "none".
    class_file: str = "none"
    fallback: bool = False
    default_workdir: str | None = None
    default_stages: tuple[str, ...] | None = None
    default_root: Callable[[Path], Path] | None = None
    prepare: Callable[[Any], object] | None = None  # called with the StageContext before the preflights


DATA_SOURCES: dict[str, DataSourceSpec] = {}

#: ``train_clims.prompts`` value meaning "the registry of the data set's class file".
DATASET_PROMPTS = "dataset"

#: The loss recipe (template, weights, reductions) a plain class list takes from each variant's registry.
RECIPE_PRESETS = {"paper": "voc", "official": "voc-official"}


def register_data_source(spec: DataSourceSpec) -> DataSourceSpec:
    if spec.name in DATA_SOURCES:
        raise ValueError(f"data source {spec.name!r} is registered twice")
    DATA_SOURCES[spec.name] = spec
    return spec


def data_source_spec(name: str) -> DataSourceSpec:
    if name not in DATA_SOURCES:
        load_plugins()  # a plug-in's data source, for callers that did not go through the command line
    if name not in DATA_SOURCES:
        raise ValueError(f"expected --dataset to be one of {sorted(DATA_SOURCES)}, got {name!r}")
    return DATA_SOURCES[name]


def build_source(dataset: str, root: str, cache_dir: Path, classes: str = "") -> SegmentationSource:
    """Open a data set; ``classes`` is ``data.classes`` (a class file, "" for the root's own or none)."""
    spec = data_source_spec(dataset)
    if not root:
        raise DatasetError(f"--dataset {dataset} needs --data-root ({spec.root_help})")
    source = spec.build(Path(root), cache_dir)
    if spec.class_file == "none":
        if classes:
            raise DatasetError(
                f"--classes {classes}: --dataset {dataset} has its own classes; a class file goes with a "
                f"data set in the VOC or the simple layout (--dataset voc or simple)"
            )
        return source
    class_file = Path(classes).expanduser() if classes else find_class_file(source.root)
    if class_file is None:
        if spec.class_file == "required":
            raise DatasetError(
                f"--dataset {dataset} needs its classes: put a class list ({CLASS_FILE_NAMES[1]}, one class "
                f"a line, optionally 'name: prompt words') or a registry ({CLASS_FILE_NAMES[0]}) in "
                f"{source.root}, or pass --classes FILE"
            )
        return source
    source.declare_classes(read_class_file(class_file))
    return source


register_data_source(
    DataSourceSpec(
        name="voc",
        build=lambda root, cache_dir: VOCSource(root),
        root_help="a VOCdevkit/VOC2012 directory (or any VOC-layout root); --voc-root is the same",
        prompt_presets={"paper": "voc", "official": "voc-official"},
        class_file="optional",
    )
)

register_data_source(
    DataSourceSpec(
        name="coco",
        build=lambda root, cache_dir: COCOSource(root, mask_cache_dir=cache_dir / "coco_masks"),
        root_help="the COCO 2014 root holding train2014/, val2014/, annotations/; --coco-root is the same",
        prompt_presets={"paper": "coco", "official": "coco"},
        train_split="train",
        eval_split="val",
    )
)


# ------------------------------------------------------------------------------------------------------
# transforms and torch datasets


def normalize_image(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32, ImageNet-normalised (for the backbone and the evaluator)."""
    array: np.ndarray = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def random_rescale_long_side(
    image: Image.Image, rng: np.random.Generator, long_range: tuple[int, int]
) -> Image.Image:
    target_long = int(rng.integers(long_range[0], long_range[1] + 1))
    width, height = image.size
    scale = target_long / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BILINEAR)


def random_crop_with_padding(array: np.ndarray, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``crop_size`` square of a (C, H, W) array; smaller sides are zero-padded (0 = the mean colour
    after normalisation) at a random offset, so every crop has the same shape and a batch can be stacked."""
    channels, height, width = array.shape
    out = np.zeros((channels, crop_size, crop_size), dtype=array.dtype)
    src_y, dst_y, span_y = _crop_offsets(height, crop_size, rng)
    src_x, dst_x, span_x = _crop_offsets(width, crop_size, rng)
    out[:, dst_y : dst_y + span_y, dst_x : dst_x + span_x] = array[
        :, src_y : src_y + span_y, src_x : src_x + span_x
    ]
    return out


def _crop_offsets(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    if length >= crop:
        return int(rng.integers(0, length - crop + 1)), 0, crop
    return 0, int(rng.integers(0, crop - length + 1)), length


class TrainCropDataset(Dataset[dict[str, Any]]):
    """Training samples: random rescale (long side), horizontal flip, ImageNet normalisation, random crop.

    Indexed by ``(epoch, index)`` pairs (see :class:`EpochIndexSampler`): each sample's augmentation is drawn
    from
    a generator seeded by ``(seed, epoch, index)``, so it does not depend on the number of data-loader
    workers,
    on how ranks shard the data, or on whether the run was resumed.
    """

    def __init__(
        self,
        source: SegmentationSource,
        image_ids: Sequence[str],
        labels: dict[str, list[int]],
        resize_long: tuple[int, int],
        crop_size: int,
        seed: int,
    ):
        self.source = source
        self.image_ids = list(image_ids)
        self.labels = [multi_hot(labels[image_id], source.num_classes) for image_id in self.image_ids]
        self.resize_long = resize_long
        self.crop_size = crop_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        image = self.source.load_image(self.image_ids[index])
        image = random_rescale_long_side(image, rng, self.resize_long)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = random_crop_with_padding(normalize_image(image), self.crop_size, rng)
        return {
            "image": torch.from_numpy(crop),
            "label": torch.from_numpy(self.labels[index]),
            "index": index,
        }


class EpochIndexSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Wraps a (Distributed)Sampler so that it yields ``(epoch, index)`` for :class:`TrainCropDataset`.

    ``set_epoch(epoch, skip)`` leaves out the first ``skip`` indices of this rank's order for the epoch:
    resuming mid-epoch skips the batches already trained without loading them.
    """

    def __init__(self, sampler: torch.utils.data.DistributedSampler[int]):
        self.sampler = sampler
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class FullImageDataset(Dataset[dict[str, Any]]):
    """Whole images at full resolution, normalised, with labels (for inference)."""

    def __init__(self, source: SegmentationSource, image_ids: Sequence[str], labels: dict[str, list[int]]):
        self.source = source
        self.image_ids = list(image_ids)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        array = normalize_image(self.source.load_image(image_id))
        return {
            "id": image_id,
            "image": torch.from_numpy(array),
            "label": torch.from_numpy(multi_hot(self.labels[image_id], self.source.num_classes)),
        }
