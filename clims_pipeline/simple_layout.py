"""The simple layout: a folder of images and one label file, the quickest way to bring your own data.

::

    root/
      images/<id>.jpg|.png|...    the images (any format PIL reads)
      labels.csv                  image,labels[,split]   labels separated by ";" (empty: no object)
        or labels.jsonl           {"image": "<id>", "labels": ["boat", "person"], "split": "train"}
      classes.txt                 one class a line, optionally "name: prompt words" (or classes.json, a
                                  clims_loss.BackgroundPromptRegistry; or --classes FILE)
      masks/<id>.png              optional, for evaluation only: 0 background, k + 1 class k, 255 void
      splits/<split>.txt          optional: the ids of a split, one a line (else the split column)

``image`` is the image's file name under ``images/`` or its stem; the stem is the image id. Split ``all``
is every image of the label file. Every problem of a line (an unknown class, a missing image, an id on two
lines) is reported by the preflight with the file and the line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .data import DATASET_PROMPTS, DatasetError, DataSourceSpec, SegmentationSource, register_data_source

LABEL_FILES = ("labels.csv", "labels.jsonl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: The split that holds every image of the label file.
ALL_SPLIT = "all"
#: Label files that are not one of the two formats are reported with at most this many bad lines.
SHOWN_BAD_LINES = 10


@dataclass
class LabelLine:
    """One image of the label file: where it is named, its file, its class names, its split."""

    line: int
    file_name: str
    names: list[str]
    split: str
    problems: list[tuple[str, str]] = field(default_factory=list)


class SimpleSource(SegmentationSource):
    """A data set in the simple layout (see the module); its classes come from a class file."""

    name = "simple"
    class_names: tuple[str, ...] = ()

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not (self.root / "images").is_dir():
            raise DatasetError(f"no simple layout under {self.root}: expected {self.root / 'images'}/")
        present = [self.root / name for name in LABEL_FILES if (self.root / name).is_file()]
        if not present:
            raise DatasetError(
                f"no label file in {self.root}: expected {' or '.join(LABEL_FILES)} (docs/own-data.md)"
            )
        if len(present) > 1:
            raise DatasetError(f"two label files in {self.root}: {[p.name for p in present]}; keep one")
        self.labels_path = present[0]

    # ---------------------------------------------------------------------------------- the label file
    @cached_property
    def table(self) -> dict[str, LabelLine]:
        """Image id -> its line of the label file, with the line's problems (read once, after the classes
        are declared)."""
        rows, bad = self._read_rows()
        if bad:
            shown = "\n".join(f"  - {message}" for message in bad[:SHOWN_BAD_LINES])
            more = f"\n  ... and {len(bad) - SHOWN_BAD_LINES} more" if len(bad) > SHOWN_BAD_LINES else ""
            raise DatasetError(f"{len(bad)} unreadable line(s) in {self.labels_path}:\n{shown}{more}")
        known = set(self.class_names)
        class_file = self.class_set.path if self.class_set is not None else "the class file"
        table: dict[str, LabelLine] = {}
        for line, image, names, split in rows:
            image_id = Path(image).stem if Path(image).suffix.lower() in IMAGE_SUFFIXES else image
            entry = LabelLine(line, image, names, split)
            for name in names:
                if name not in known:
                    entry.problems.append(
                        (
                            "unknown class",
                            f"{self.labels_path} line {line}: unknown class {name!r} for image {image_id!r}; "
                            f"{class_file} declares {', '.join(self.class_names)}",
                        )
                    )
            if image_id in table:
                first = table[image_id]
                first.problems.append(
                    (
                        "duplicate id",
                        f"{self.labels_path}: image {image_id!r} is on lines {first.line} and {line}; "
                        "keep one line per image",
                    )
                )
                continue
            table[image_id] = entry
        return table

    def _read_rows(self) -> tuple[list[tuple[int, str, list[str], str]], list[str]]:
        """(line, image, class names, split) of every line, and the messages of lines that cannot be read."""
        rows: list[tuple[int, str, list[str], str]] = []
        bad: list[str] = []
        text = self.labels_path.read_text(encoding="utf-8")
        if self.labels_path.suffix == ".csv":
            reader = csv.reader(text.splitlines())
            header = [column.strip() for column in next(reader, [])]
            if "image" not in header or "labels" not in header:
                raise DatasetError(
                    f"{self.labels_path} line 1: expected a header with columns 'image' and 'labels' (and "
                    f"optionally 'split'), got {header}"
                )
            columns = {name: header.index(name) for name in ("image", "labels", "split") if name in header}
            for line, cells in enumerate(reader, start=2):
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(header):
                    bad.append(
                        f"line {line}: expected {len(header)} columns ({','.join(header)}), got {cells}"
                    )
                    continue
                value = {name: cells[index].strip() for name, index in columns.items()}
                rows.append((line, value["image"], split_labels(value["labels"]), value.get("split", "")))
        else:
            for line, raw in enumerate(text.splitlines(), start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as error:
                    bad.append(f"line {line}: not JSON ({error})")
                    continue
                labels = record.get("labels") if isinstance(record, dict) else None
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    bad.append(
                        f'line {line}: expected an object with "image" (a string), got {raw.strip()!r}'
                    )
                    continue
                if isinstance(labels, str):
                    labels = split_labels(labels)
                if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
                    bad.append(f'line {line}: expected "labels" to be a list of class names, got {labels!r}')
                    continue
                split = record.get("split", "")
                rows.append((line, record["image"].strip(), [n.strip() for n in labels], str(split)))
        for line, image, _, _ in rows:
            if not image or "/" in image or "\\" in image:
                bad.append(
                    f"line {line}: expected an image file name under images/ (no folders), got {image!r}"
                )
        return rows, bad

    # ---------------------------------------------------------------------------------- splits and files
    def split_file(self, split: str) -> Path:
        return self.root / "splits" / f"{split}.txt"

    def list_file(self, split: str) -> str:
        if split != ALL_SPLIT and self.split_file(split).is_file():
            return str(self.split_file(split))
        return f"{self.labels_path} ({'every line' if split == ALL_SPLIT else f'split column = {split}'})"

    def ids(self, split: str) -> list[str]:
        table = self.table
        if split == ALL_SPLIT:
            return list(table)
        list_path = self.split_file(split)
        if list_path.is_file():
            lines = [line.strip() for line in list_path.read_text(encoding="utf-8").splitlines()]
            return [
                Path(line).stem if Path(line).suffix.lower() in IMAGE_SUFFIXES else line
                for line in lines
                if line and not line.startswith("#")
            ]
        splits = sorted({entry.split for entry in table.values() if entry.split})
        if not splits:
            raise DatasetError(
                f"missing split list: no {list_path} and {self.labels_path} has no split column; add one "
                f"(e.g. train / val), write {list_path}, or use split '{ALL_SPLIT}' (every image)"
            )
        ids = [image_id for image_id, entry in table.items() if entry.split == split]
        if not ids:
            raise DatasetError(
                f"split {split!r}: no line of {self.labels_path} has split {split!r} (its splits: "
                f"{', '.join(splits)}) and there is no {list_path}"
            )
        return ids

    def image_path(self, image_id: str) -> Path:
        entry = self.table.get(image_id)
        if entry is not None and Path(entry.file_name).suffix.lower() in IMAGE_SUFFIXES:
            return self.root / "images" / entry.file_name
        for suffix in IMAGE_SUFFIXES:
            candidate = self.root / "images" / f"{image_id}{suffix}"
            if candidate.is_file():
                return candidate
        return self.root / "images" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"

    def has_masks(self, split: str) -> bool:
        return (self.root / "masks").is_dir()

    # ---------------------------------------------------------------------------------- labels and checks
    def compute_labels(self, image_id: str) -> list[int]:
        entry = self.table.get(image_id)
        if entry is None:
            raise DatasetError(f"image {image_id!r} has no line in {self.labels_path}")
        return sorted({self.class_names.index(n) for n in entry.names if n in self.class_names})

    def label_file(self, image_id: str, need_masks: bool, need_labels: bool) -> Path | None:
        if need_masks:
            return self.mask_path(image_id)
        return self.labels_path if need_labels else None

    def preflight_files(self, image_id: str, need_masks: bool, need_labels: bool) -> list[Path]:
        mask = [self.mask_path(image_id)] if need_masks else []
        return [self.image_path(image_id), self.labels_path, *mask]

    def label_files(self, image_id: str) -> list[Path]:
        return [self.labels_path]

    def check_label_file(self, path: Path, image_size: tuple[int, int] | None) -> list[tuple[str, str]]:
        if path == self.labels_path:
            return []  # its lines' problems are the table's (check_item)
        return super().check_label_file(path, image_size)

    def check_item(self, image_id: str, need_masks: bool, need_labels: bool) -> list[tuple[str, str]]:
        entry = self.table.get(image_id)
        if entry is None:
            return [("unlabelled image", f"image id {image_id!r} has no line in {self.labels_path}")]
        problems = list(entry.problems)
        for kind, message in super().check_item(image_id, need_masks, need_labels):
            if kind in ("missing image", "unreadable image"):
                message = f"{message} (named on line {entry.line} of {self.labels_path.name})"
            problems.append((kind, message))
        return problems


def split_labels(text: str) -> list[str]:
    """``"boat; person"`` -> ``["boat", "person"]`` (empty: an image without objects)."""
    return [name.strip() for name in text.split(";") if name.strip()]


register_data_source(
    DataSourceSpec(
        name="simple",
        build=lambda root, cache_dir: SimpleSource(root),
        root_help="a folder holding images/, labels.csv or labels.jsonl, classes.txt and optionally masks/ "
        "(docs/own-data.md)",
        prompt_presets={"paper": DATASET_PROMPTS, "official": DATASET_PROMPTS},
        train_split="train",
        eval_split="val",
        class_file="required",
    )
)
