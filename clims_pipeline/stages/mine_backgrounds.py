"""Stage ``mine_backgrounds``: rank each class's co-occurring backgrounds with CLIP instead of writing them.

It encodes the training split's images with the CLIP that ``train_clims`` uses (``--clip``,
``--clip-pretrained``), scores every vocabulary term for every class with ``clims_loss.mine_backgrounds``
(docs/mining.md) and writes, in ``<workdir>/mine_backgrounds/``:

* ``mined_backgrounds.json``: the variant's registry with the mined class backgrounds and their scores. It is
  the file ``train_clims --backgrounds mined`` reads; read it, edit it (delete a term, add one), rerun.
* ``mined_backgrounds.md``: the top terms per class with score, presence and objectness, for people.
* ``scores.json``: every term's scores for every class, and the settings the file was mined with.

A summary goes to ``results.json`` under ``mined_backgrounds``. Under ``torchrun`` only rank 0 mines (one
forward pass over the split, cheap next to training); the other ranks wait at a barrier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import clims_loss as cl
from clims_loss.clip_loading import clip_input_size, clip_normalization

from ..clip_setup import (
    base_registry,
    clip_inputs,
    load_clip,
    registry_identity,
    resolve_clip_pretrained,
    seeded_subset,
)
from ..context import Stage, StageContext, register_stage
from ..data import SegmentationSource, multi_hot
from ..distributed import barrier
from ..files import atomic_write, write_json
from ..runstate import describe_changes
from ..training import check_training_data

STAGE = "mine_backgrounds"
MINED_FILE = "mined_backgrounds.json"
TABLE_FILE = "mined_backgrounds.md"
SCORES_FILE = "scores.json"
#: How many terms per class the markdown table shows (the registry keeps at most ``top_l``).
TABLE_ROWS = 5


def read_vocabulary(path: str) -> list[str]:
    """Terms of a vocabulary file: one per line; blank lines and ``#`` comments are skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--mine-vocabulary: no such file: {file}")
    terms = [line.split("#", 1)[0].strip() for line in file.read_text(encoding="utf-8").splitlines()]
    terms = list(dict.fromkeys(term for term in terms if term))
    if not terms:
        raise ValueError(f"--mine-vocabulary: {file} lists no terms")
    return terms


def vocabulary(ctx: StageContext) -> list[str]:
    path = ctx.config.mine_backgrounds.vocabulary
    return read_vocabulary(path) if path else list(cl.DEFAULT_BACKGROUND_VOCABULARY)


class ClipImages(Dataset[torch.Tensor]):
    """Whole images resized to CLIP's square input (as the evaluator resizes its views), CLIP-normalised."""

    def __init__(
        self,
        source: SegmentationSource,
        image_ids: list[str],
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        self.source, self.image_ids, self.size = source, image_ids, size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.source.load_image(self.image_ids[index])
        resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std


def _settings(ctx: StageContext, terms: list[str]) -> dict[str, Any]:
    """What the mined file depends on: a rerun with other settings must not silently reuse it."""
    clims = ctx.config.train_clims
    return {
        "clip": clims.clip,
        "clip_pretrained": resolve_clip_pretrained(ctx),
        "prompts": clims.prompts,
        **registry_identity(ctx),
        "dataset": ctx.config.dataset,
        "train_split": ctx.config.data.train_split,
        "seed": ctx.seed,
        **{
            k: v
            for k, v in asdict(ctx.config.mine_backgrounds).items()
            if k not in ("vocabulary", "batch_size")
        },
        "vocabulary_file": ctx.config.mine_backgrounds.vocabulary,
        "vocabulary_sha256": hashlib.sha256("\n".join(terms).encode("utf-8")).hexdigest(),
        "vocabulary_size": len(terms),
    }


def score_table(scores: dict[str, list[Any]], registry: Any, rows: int = TABLE_ROWS) -> str:
    """Markdown: per class, the mined terms and the next best, with score, presence and objectness."""
    lines = [
        f"# Mined background prompts ({registry.name})",
        "",
        "score = presence - penalty * max(objectness, 0); **bold** terms are in the registry.",
        "",
        "| class | rank | term | score | presence | objectness |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for class_name in registry.class_names:
        kept = set(registry.class_backgrounds.get(class_name, ()))
        for rank, entry in enumerate(scores[class_name][:rows], start=1):
            term = f"**{entry.term}**" if entry.term in kept else entry.term
            lines.append(
                f"| {class_name if rank == 1 else ''} | {rank} | {term} | {entry.score:.4f} | "
                f"{entry.presence:.4f} | {entry.objectness:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _clip_batches(loader: DataLoader[torch.Tensor], enabled: bool) -> Iterator[torch.Tensor]:
    yield from tqdm(loader, desc=STAGE, disable=not enabled, dynamic_ncols=True)


def _mine(ctx: StageContext, image_ids: list[str], labels: dict[str, list[int]], terms: list[str]) -> Any:
    mining = ctx.config.mine_backgrounds
    clip_model, tokenizer = load_clip(ctx)  # random CLIP weights (tests) are the ones train_clims builds
    clip_model.eval()
    size = clip_input_size(clip_model)
    mean, std = clip_normalization(clip_model, (cl.CLIP_MEAN, cl.CLIP_STD))
    loader = DataLoader(
        ClipImages(ctx.source, image_ids, size, mean, std),
        batch_size=mining.batch_size,
        shuffle=False,
        num_workers=ctx.config.data.num_workers,
    )
    label_matrix = torch.from_numpy(
        np.stack([multi_hot(labels[image_id], ctx.source.num_classes) for image_id in image_ids])
    )
    return cl.mine_backgrounds(
        clip_model,
        tokenizer,
        _clip_batches(loader, ctx.dist.is_main),
        label_matrix,
        base_registry(ctx),
        terms,
        top_l=mining.top_l,
        margin=mining.margin,
        max_objectness=mining.max_objectness,
        objectness_penalty=mining.objectness_penalty,
    )


@register_stage
class MineBackgrounds(Stage):
    name, order = STAGE, 15
    help = "rank each class's co-occurring background terms with CLIP (for train_clims --backgrounds mined)"

    def inputs(self, ctx: StageContext) -> tuple[str, ...]:
        return clip_inputs(ctx)

    def check(self, ctx: StageContext) -> None:
        check_training_data(ctx)
        vocabulary(ctx)
        base_registry(ctx)  # a registry that does not fit the data set stops the run before any work

    def run(self, ctx: StageContext) -> None:
        mine(ctx)


def mine(ctx: StageContext) -> None:
    terms = vocabulary(ctx)
    settings = _settings(ctx, terms)
    output = ctx.output(STAGE, ctx.workdir / STAGE, settings)
    out_dir = output.directory
    out_path, scores_path = out_dir / MINED_FILE, out_dir / SCORES_FILE
    if out_path.exists() and not ctx.force:
        changes = output.changes()
        if changes:
            # The mined file is meant to be edited: never overwrite it without --force.
            raise RuntimeError(
                f"{out_path} was mined with other settings ({describe_changes(changes)} changed); rerun with "
                f"--force to mine it again (this overwrites edits to it) or use another --workdir"
            )
        ctx.print(f"[{STAGE}] done already: {out_path} (use --force to mine again; edits are kept)")
        return
    output.begin()

    split = ctx.config.data.train_split
    image_ids = seeded_subset(
        ctx.validate_split(split, need_labels=True),
        ctx.config.mine_backgrounds.max_images,
        ctx.seed,
        "mine_backgrounds.max_images",
    )
    labels = ctx.labels(split)  # every rank: it synchronises the label cache
    if ctx.dist.is_main:
        registry, scores = _mine(ctx, image_ids, labels, terms)
        atomic_write(out_path, lambda file: file.write((registry.to_json() + "\n").encode("utf-8")))
        table = score_table(scores, registry)
        atomic_write(out_dir / TABLE_FILE, lambda file: file.write(table.encode("utf-8")))
        write_json(
            scores_path,
            {
                "settings": settings,
                "images": len(image_ids),
                "scores": {c: [asdict(s) for s in entries] for c, entries in scores.items()},
            },
        )
        summary = {
            "file": str(out_path),
            "images": len(image_ids),
            "split": split,
            "vocabulary_size": len(terms),
            "top_l": ctx.config.mine_backgrounds.top_l,
            "margin": ctx.config.mine_backgrounds.margin,
            "clip": ctx.config.train_clims.clip,
            "clip_pretrained": ctx.config.train_clims.clip_pretrained,
            "class_backgrounds": {c: list(t) for c, t in registry.class_backgrounds.items()},
            "background_scores": {c: list(s) for c, s in registry.background_scores.items()},
            "classes_without_backgrounds": [
                c for c in registry.class_names if c not in registry.class_backgrounds
            ],
        }
        ctx.update_results({"mined_backgrounds": summary}, stage=STAGE)
        ctx.logger(STAGE).log("mined", None, **summary)
        for class_name in registry.class_names:
            kept = zip(
                registry.class_backgrounds.get(class_name, ()),
                registry.background_scores.get(class_name, ()),
                strict=True,
            )
            ctx.print(f"[{STAGE}] {class_name}: " + (", ".join(f"{t} ({s:.4f})" for t, s in kept) or "-"))
        ctx.print(f"[{STAGE}] wrote {out_path} ({len(image_ids)} images, {len(terms)} terms)")
    output.complete(images=len(image_ids))
    barrier()
