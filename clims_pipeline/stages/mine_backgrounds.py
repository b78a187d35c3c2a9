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

The stage also resolves ``--backgrounds`` for ``train_clims`` (:func:`resolve_backgrounds`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..context import StageContext, register_stage
from ..data import SegmentationSource, multi_hot
from ..distributed import barrier
from ..files import atomic_write, read_json, write_json
from ..training import check_training_data

STAGE = "mine_backgrounds"
MINED_FILE = "mined_backgrounds.json"
TABLE_FILE = "mined_backgrounds.md"
SCORES_FILE = "scores.json"
#: How many terms per class the markdown table shows (the registry keeps at most ``top_l``).
TABLE_ROWS = 5
#: The registry fields that ``--backgrounds FILE`` takes from the file; the variant defines all others.
BACKGROUND_FIELDS = ("class_backgrounds", "global_backgrounds", "background_template", "background_scores")


def mined_path(ctx: StageContext) -> Path:
    return ctx.workdir / STAGE / MINED_FILE


def base_registry(ctx: StageContext) -> Any:
    """The variant's registry: a library preset, or the toy world's prompts (not a library preset)."""
    import clims_loss as cl

    if ctx.config.train_clims.prompts == "toy":
        from ..toy.experiment import toy_registry

        return toy_registry()
    return cl.BackgroundPromptRegistry.preset(ctx.config.train_clims.prompts)


def resolved_clip_pretrained(ctx: StageContext) -> str | None:
    """``--clip-pretrained`` as train_clims resolves it (``train_clip``: the file that stage wrote)."""
    from .train_clip import resolve_clip_pretrained

    value = resolve_clip_pretrained(ctx)
    return None if value in ("", "none", None) else value


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
    import clims_loss as cl

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


def _select_ids(image_ids: list[str], max_images: int | None, seed: int) -> list[str]:
    if max_images is None or max_images >= len(image_ids):
        return image_ids
    if max_images < 1:
        raise ValueError(f"mine_backgrounds.max_images: expected >= 1 or null, got {max_images}")
    chosen = np.random.default_rng(seed).choice(len(image_ids), size=max_images, replace=False)
    return [image_ids[i] for i in sorted(chosen)]


def _settings(ctx: StageContext, terms: list[str]) -> dict[str, Any]:
    """What the mined file depends on: a rerun with other settings must not silently reuse it."""
    clims = ctx.config.train_clims
    return {
        "clip": clims.clip,
        "clip_pretrained": resolved_clip_pretrained(ctx),
        "prompts": clims.prompts,
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
    import clims_loss as cl
    from clims_loss.clip_loading import clip_input_size, clip_normalization

    from ..clip_training import register_model_configs
    from .train_clims import register_clip_configs

    clims, mining = ctx.config.train_clims, ctx.config.mine_backgrounds
    register_model_configs()  # the toy world's tiny CLIP
    register_clip_configs(getattr(ctx.args, "clip_config", None))
    torch.manual_seed(ctx.seed)  # random CLIP weights (tests) are the ones train_clims builds
    clip_model, tokenizer = cl.load_open_clip(clims.clip, resolved_clip_pretrained(ctx), device=ctx.device)
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


def preflight(ctx: StageContext) -> None:
    check_training_data(ctx)
    vocabulary(ctx)


@register_stage(
    STAGE,
    order=15,
    help="rank each class's co-occurring background terms with CLIP (for train_clims --backgrounds mined)",
    preflight=preflight,
)
def run(ctx: StageContext) -> None:
    out_dir = ctx.stage_dir(STAGE)
    out_path, scores_path = out_dir / MINED_FILE, out_dir / SCORES_FILE
    terms = vocabulary(ctx)
    settings = _settings(ctx, terms)
    if out_path.exists() and not ctx.force:
        written = read_json(scores_path)["settings"] if scores_path.exists() else None
        if written is not None and written != settings:
            raise RuntimeError(
                f"{out_path} was mined with other settings ({written}); rerun with --force to mine it "
                f"again (this overwrites edits to it) or use another --workdir"
            )
        ctx.print(f"[{STAGE}] done already: {out_path} (use --force to mine again; edits are kept)")
        return

    split = ctx.config.data.train_split
    image_ids = _select_ids(
        ctx.validate_split(split, need_labels=True), ctx.config.mine_backgrounds.max_images, ctx.seed
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
        ctx.update_results({"mined_backgrounds": summary})
        ctx.logger(STAGE).log("mined", **summary)
        for class_name in registry.class_names:
            kept = zip(
                registry.class_backgrounds.get(class_name, ()),
                registry.background_scores.get(class_name, ()),
                strict=True,
            )
            ctx.print(f"[{STAGE}] {class_name}: " + (", ".join(f"{t} ({s:.4f})" for t, s in kept) or "-"))
        ctx.print(f"[{STAGE}] wrote {out_path} ({len(image_ids)} images, {len(terms)} terms)")
    barrier()


# ------------------------------------------------------------------------------------- --backgrounds


def resolve_backgrounds(ctx: StageContext, *, must_exist: bool = True) -> tuple[Any, dict[str, Any]]:
    """The registry ``train_clims`` uses and its identity (part of the checkpoint fingerprint).

    ``preset``: the variant's registry. ``mined``: ``<workdir>/mine_backgrounds/mined_backgrounds.json``.
    Anything else: a registry JSON file. From a file only the background fields (:data:`BACKGROUND_FIELDS`)
    are taken; class names must match the variant's, whose templates, weights and CBS settings stay.
    With ``must_exist=False`` a missing mined file (still to be written by an earlier stage of this run)
    returns ``(None, {})``.
    """
    import clims_loss as cl

    choice = ctx.config.train_clims.backgrounds or "preset"
    base = base_registry(ctx)
    if choice == "preset":
        # "toy" is the identity toy-world runs were first written with; kept so that they still resume.
        return base, {"backgrounds": "toy" if ctx.config.train_clims.prompts == "toy" else "preset"}
    if choice == "mined":
        path = mined_path(ctx)
        if not path.is_file():
            if not must_exist:
                return None, {}
            raise FileNotFoundError(
                f"--backgrounds mined: missing {path}; run the {STAGE} stage first "
                f"(e.g. --stages {STAGE},train_clims), or pass a registry JSON file"
            )
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--backgrounds: {choice!r} is neither 'preset', 'mined' nor an existing registry JSON file"
            )
    try:
        loaded = cl.BackgroundPromptRegistry.from_json(path)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"--backgrounds: {path} is not a valid registry JSON: {error}") from error
    if tuple(loaded.class_names) != tuple(base.class_names):
        raise ValueError(
            f"--backgrounds: {path} has classes {list(loaded.class_names)}, the variant's prompt preset "
            f"{base.name!r} has {list(base.class_names)}"
        )
    registry = base.replace(name=loaded.name, **{name: getattr(loaded, name) for name in BACKGROUND_FIELDS})
    if registry.weights.cbs != 0 and not registry.uses_cbs:
        raise ValueError(
            f"--backgrounds: {path} holds no background terms but the CBS weight is {registry.weights.cbs}; "
            f"add terms to it (or mine with a lower --mine-margin)"
        )
    used = {name: registry.to_dict()[name] for name in BACKGROUND_FIELDS}
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode("utf-8")).hexdigest()
    return registry, {"backgrounds": choice, "file": str(path.resolve()), "sha256": digest}


def preflight_backgrounds(ctx: StageContext) -> None:
    """Fail before any training when ``--backgrounds`` names a missing or invalid file."""
    resolve_backgrounds(ctx, must_exist=STAGE not in ctx.requested_stages)


def check_finished_model(ctx: StageContext, model_path: Path, identity: dict[str, Any]) -> None:
    """A finished ``train_clims`` model trained with other backgrounds must not be reused silently."""
    payload = torch.load(model_path, map_location="cpu", weights_only=False)
    trained_with = payload.get("meta", {}).get("backgrounds", {"backgrounds": "preset"})
    if trained_with != identity:
        raise RuntimeError(
            f"{model_path} was trained with backgrounds {trained_with}, this run asks for {identity}; "
            f"rerun with --force to retrain train_clims, or use another --workdir"
        )
