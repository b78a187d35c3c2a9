"""Stage ``check_clip``: the CLIP readiness report, after the baseline CAM network and before CLIMS training.

With the evaluator ``train_clims`` will build (its CLIP, prompts, backgrounds and masking), it runs
``clims_loss.clip_readiness`` on a seeded subset of the training split (``check_clip.max_images``): whole
images, their image-level labels and the baseline network's CAMs (``train_cam``'s weights, scale 1 + flip,
each map divided by its maximum). No ground-truth mask is read. It writes, in ``<workdir>/check_clip/``:

* ``readiness.json``: every class's scores and flags (``clims_loss.ReadinessReport.to_json``);
* ``readiness.md``: the same as a table for people (docs/readiness.md explains how to read it);

puts a summary in ``results.json`` under ``clip_readiness`` and prints the classes at risk of collapse. With
``check_clip.stop_if_at_risk`` the pipeline stops there when any class is at risk. Under ``torchrun`` only
rank 0 measures (a CLIP forward over a few hundred images); the others wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

import clims_loss as cl

from ..cams import multiscale_cams, same_size_batches
from ..clip_setup import build_evaluator, clip_identity, clip_inputs, resolve_backgrounds, seeded_subset
from ..context import Stage, StageContext, register_stage
from ..data import FullImageDataset
from ..distributed import barrier, broadcast_object
from ..files import atomic_write, read_json
from ..networks import CAMNet, build_network
from ..training import check_training_data, data_fingerprint, final_model_path, load_final_model, model_digest

STAGE = "check_clip"
JSON_FILE = "readiness.json"
TABLE_FILE = "readiness.md"


def _check_settings(ctx: StageContext) -> None:
    config = ctx.config.check_clip
    for name in ("margin", "min_separation"):
        value = getattr(config, name)
        if not 0.0 <= value <= (1.0 if name == "min_separation" else 2.0):
            raise ValueError(
                f"check_clip.{name}: expected a number in [0, 1] (margin: [0, 2]), got {value!r}"
            )
    if config.batch_size < 1:
        raise ValueError(f"check_clip.batch_size: expected an integer >= 1, got {config.batch_size}")
    if config.max_images is not None and config.max_images < 1:
        raise ValueError(f"check_clip.max_images: expected >= 1 or null, got {config.max_images}")


def _fingerprint(ctx: StageContext, backgrounds: dict[str, Any]) -> dict[str, Any]:
    """What the report depends on: the baseline model, the CLIP, the prompts, the images and the settings."""
    settings = {
        k: v for k, v in asdict(ctx.config.check_clip).items() if k not in ("batch_size", "stop_if_at_risk")
    }
    return {
        "baseline": model_digest(ctx, "train_cam"),
        "network": asdict(ctx.config.network),
        "data": data_fingerprint(ctx),
        "clip": clip_identity(ctx),
        "prompts": ctx.config.train_clims.prompts,
        "backgrounds": backgrounds,
        "settings": settings,
        "seed": ctx.seed,
    }


def _batches(
    ctx: StageContext, model: CAMNet, image_ids: list[str], labels: dict[str, list[int]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, baseline CAMs divided by their maximum, labels) of same-size images, with progress."""
    sizes = {}
    for image_id in image_ids:
        with Image.open(ctx.source.image_path(image_id)) as image:
            sizes[image_id] = image.size
    ordered = sorted(image_ids, key=lambda image_id: (sizes[image_id], image_id))
    loader = DataLoader(
        FullImageDataset(ctx.source, ordered, labels),
        batch_sampler=list(same_size_batches([sizes[i] for i in ordered], ctx.config.check_clip.batch_size)),
        num_workers=ctx.config.data.num_workers,
    )
    with tqdm(total=len(ordered), desc=STAGE, disable=not ctx.dist.is_main, dynamic_ncols=True) as progress:
        for batch in loader:
            images = batch["image"].to(ctx.device)
            maps, _ = multiscale_cams(model, images, (1.0,), True, 4, ctx.amp)
            maps = maps / (maps.amax(dim=(2, 3), keepdim=True) + 1e-5)
            progress.update(len(images))
            yield images, maps.clamp(0.0, 1.0), batch["label"].to(ctx.device)


def _say_at_risk(ctx: StageContext, report: dict[str, Any], table: Path) -> list[str]:
    at_risk: list[str] = report["at_risk"]
    if not at_risk:
        ctx.print(f"[{STAGE}] no class at risk of collapse ({table})")
        return at_risk
    reasons = {entry["name"]: ", ".join(entry["flags"]) for entry in report["classes"]}
    ctx.print(f"[{STAGE}] WARNING: classes at risk of collapse in train_clims ({table}):")
    for name in at_risk:
        ctx.print(f"[{STAGE}]   {name}: {reasons[name]}")
    return at_risk


@register_stage
class CheckClip(Stage):
    name, order = STAGE, 18
    help = (
        "CLIP readiness report: which classes CLIMS would let collapse with this CLIP and prompts (no masks)"
    )

    def inputs(self, ctx: StageContext) -> tuple[str, ...]:
        return ("train_cam", *clip_inputs(ctx))

    def check(self, ctx: StageContext) -> None:
        check_training_data(ctx)
        _check_settings(ctx)
        resolve_backgrounds(ctx, must_exist="mine_backgrounds" not in ctx.requested_stages)

    def run(self, ctx: StageContext) -> None:
        registry, backgrounds = resolve_backgrounds(ctx)
        assert registry is not None  # must_exist=True returns a registry or raises
        output = ctx.output(STAGE, ctx.workdir / STAGE, _fingerprint(ctx, backgrounds))
        json_path, table_path = output.directory / JSON_FILE, output.directory / TABLE_FILE
        if not output.reuse(json_path):
            output.begin()
            split = ctx.config.data.train_split
            config = ctx.config.check_clip
            image_ids = seeded_subset(
                ctx.validate_split(split, need_labels=True),
                config.max_images,
                ctx.seed,
                "check_clip.max_images",
            )
            labels = ctx.labels(split)  # every rank: it synchronises the label cache
            if ctx.dist.is_main:
                model = build_network("cam", ctx.config.network.backbone, "none", ctx.source.num_classes)
                load_final_model(final_model_path(ctx, "train_cam"), model)
                model = model.to(ctx.device).eval()
                evaluator = build_evaluator(ctx, registry)
                report = cl.clip_readiness(
                    evaluator,
                    batches=_batches(ctx, model, image_ids, labels),
                    margin=config.margin,
                    min_separation=config.min_separation,
                    batch_size=max(config.batch_size, 32),
                )
                text = report.to_json() + "\n"
                atomic_write(json_path, lambda file: file.write(text.encode("utf-8")))
                title = (
                    f"# CLIP readiness: {ctx.config.train_clims.clip} "
                    f"({ctx.config.train_clims.clip_pretrained}), prompts {registry.name!r}, "
                    f"{ctx.config.dataset} {split}\n\n"
                )
                markdown = title + report.to_markdown()
                atomic_write(table_path, lambda file: file.write(markdown.encode("utf-8")))
                summary: dict[str, Any] = {
                    "at_risk": report.at_risk,
                    "zero_shot_accuracy": round(100 * report.zero_shot_accuracy, 2),
                    "flags": {entry.name: list(entry.flags) for entry in report.classes if entry.flags},
                    "images": report.images,
                    "split": split,
                    "file": str(json_path),
                    "units": "percent",
                }
                ctx.update_results({"clip_readiness": summary}, stage=STAGE)
                ctx.logger(STAGE).log("done", None, **summary)
            output.complete(proofs=[JSON_FILE] if ctx.dist.is_main else [], images=len(image_ids))
            barrier()
        at_risk = broadcast_object(
            _say_at_risk(ctx, read_json(json_path), table_path) if ctx.dist.is_main else None
        )
        if at_risk and ctx.config.check_clip.stop_if_at_risk:
            raise RuntimeError(
                f"check_clip: classes at risk of collapse: {', '.join(at_risk)} (see {table_path}); fix the "
                "prompt wording or the CLIP (docs/readiness.md), or set check_clip.stop_if_at_risk=false to "
                "train anyway"
            )
