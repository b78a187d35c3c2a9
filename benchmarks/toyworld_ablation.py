"""The paper's loss ablation (Table 3) and co-occurrence result (Table 4), in miniature on the toy world.

One command: generates the toy world and trains the tiny CLIP unless they are cached in ``--workdir``
(the CLIP is shared by every row and seed), then for each seed trains the baseline CAM network and four
CLIMS networks from it (OTM; + BTM; + REG; + CBS), and measures CAM mIoU on the held-out ``val`` images
with a background-threshold sweep. Prints a markdown table beside the paper's, writes JSON and a PNG grid
of CAM overlays. See docs/toyworld.md and ``clims_pipeline/toy/experiment.py`` for the protocol.

    python benchmarks/toyworld_ablation.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import clims_loss as cl
from clims_pipeline.clip_training import train_clip
from clims_pipeline.config import build_config
from clims_pipeline.toy import experiment as experiment
from clims_pipeline.toy.clip import (
    TOY_CLIP_CONFIG,
    TOY_CLIP_CORPORA,
    TOY_FROM_SCRATCH,
    toy_corpus_from_settings,
    toy_corpus_settings,
)
from clims_pipeline.toy.world import (
    CLASS_BACKGROUND,
    DEFAULT_N_TRAIN,
    DEFAULT_N_VAL,
    TOY_CLASSES,
    generate_toy_world,
)
from clims_pipeline.visualize import colorize_labels

GRID_COLUMNS = ("input", "baseline", "otm", "otm_btm", "otm_btm_reg", "full", "ground truth")


def settings_from_toy_preset(args: argparse.Namespace) -> experiment.AblationSettings:
    """The ablation's settings are the pipeline's toy preset (one source of truth), plus overrides."""
    settings = experiment.AblationSettings()
    if args.cam_steps is not None:
        settings.cam_train.max_steps = args.cam_steps
    if args.clims_steps is not None:
        settings.clims_train.max_steps = args.clims_steps
    settings.eval_limit = args.eval_images
    settings.train_limit = args.train_images
    if args.rows is not None:
        rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
        unknown = [r for r in rows if r != "baseline" and r not in experiment.ABLATION_ROWS]
        if unknown:
            raise SystemExit(
                f"--rows: expected names from baseline,{','.join(experiment.ABLATION_ROWS)}, got {unknown}"
            )
        settings.rows = rows
    if args.backgrounds is not None:
        import clims_loss as cl

        registry = cl.BackgroundPromptRegistry.from_json(args.backgrounds)
        missing = [c for c in TOY_CLASSES if c not in registry.class_backgrounds]
        if missing:
            raise SystemExit(f"--backgrounds {args.backgrounds}: no background terms for {missing}")
        settings.class_backgrounds = {c: list(registry.class_backgrounds[c]) for c in TOY_CLASSES}
    return settings


def overlay_grid(results: dict[str, Any], rows: int) -> Image.Image:
    """Rows: val images whose objects stand on their co-occurring background; columns: GRID_COLUMNS."""
    evaluation: experiment.SplitTensors = results["evaluation"]
    cams: dict[str, torch.Tensor] = results["cams"]
    chosen: list[int] = []
    for index in range(len(evaluation.ids)):
        present = [TOY_CLASSES[k] for k in torch.nonzero(evaluation.labels[index]).flatten().tolist()]
        if len(present) == 1 and present[0] in ("boat", "train", "cow", "car"):
            chosen.append(index)
        if len(chosen) == rows:
            break
    tiles = []
    for index in chosen:
        image = evaluation.raw[index]
        row = [image]
        for name in GRID_COLUMNS[1:-1]:
            if name not in cams:
                continue
            score = cams[name][index].max(dim=0).values.numpy()
            row.append(np.asarray(cl.overlay_cam(image, np.clip(score, 0.0, 1.0), alpha=0.5)))
        mask = evaluation.masks[index].numpy().copy()
        row.append(colorize_labels(np.where(mask == 255, 0, mask)))
        gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([part for tile in row for part in (tile, gap)][:-1], axis=1))
    if not tiles:
        raise ValueError("no single-object val image with a ground-background object to draw")
    gap = np.full((2, tiles[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=0)
    return Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST)


def _logit_scale(text: str) -> float | None:
    return None if text == "learned" else float(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/toyworld_ablation"))
    parser.add_argument("--json", type=Path, help="write the summary JSON here")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help="toy world: training images")
    parser.add_argument("--n-val", type=int, default=DEFAULT_N_VAL, help="toy world: held-out images")
    parser.add_argument("--clip-epochs", type=int, default=int(TOY_FROM_SCRATCH["epochs"]))
    parser.add_argument("--clip-steps", type=int, help="cap on CLIP training steps (tests)")
    preset_clip = build_config("toy", "paper", "toy").train_clip
    parser.add_argument(
        "--clip-corpus",
        choices=sorted(TOY_CLIP_CORPORA),
        default=preset_clip.corpus,
        help="the tiny CLIP's corpus: the world's captions; 'web' (+ cut-outs, object-free pictures); "
        "'web_dark' (web + darkened scene copies captioned as dark; see docs/toyworld.md). "
        "Default: the toy preset's (%(default)s)",
    )
    parser.add_argument(
        "--clip-cutouts", type=int, help="override the corpus' number of cut-out objects (tests)"
    )
    parser.add_argument(
        "--clip-backgrounds", type=int, help="override its extra object-free pictures (tests)"
    )
    parser.add_argument(
        "--clip-logit-scale",
        type=_logit_scale,
        default=preset_clip.fixed_logit_scale,
        help="hold the tiny CLIP's temperature at this value (100 is CLIP's), or 'learned'. "
        "Default: the toy preset's (%(default)s)",
    )
    parser.add_argument("--cam-steps", type=int, help="cap on baseline CAM training steps (tests)")
    parser.add_argument("--clims-steps", type=int, help="CLIMS steps per row (default: the toy preset's)")
    parser.add_argument("--train-images", type=int, help="use only the first N training images (tests)")
    parser.add_argument("--eval-images", type=int, help="evaluate on the first N val images (tests)")
    parser.add_argument("--grid-rows", type=int, default=6)
    parser.add_argument("--rows", help="comma-separated rows to run (default: all), e.g. baseline,full")
    parser.add_argument(
        "--backgrounds",
        type=Path,
        help="registry JSON (e.g. mine_backgrounds' mined_backgrounds.json) whose class backgrounds replace "
        "the hand-written toy ones in the CBS term",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 was fastest on 2 shared cores)"
    )
    parser.add_argument("--verbose", action="store_true", help="log training losses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    world = args.workdir / "toyworld"
    generate_toy_world(world, n_train=args.n_train, n_val=args.n_val, seed=0, progress=False)
    world_seconds = time.perf_counter() - started
    corpus = dict(toy_corpus_settings(args.clip_corpus))
    if args.clip_cutouts is not None:
        corpus["object_cutouts"] = args.clip_cutouts
    if args.clip_backgrounds is not None:
        corpus["extra_backgrounds"] = args.clip_backgrounds
    corpus_tag = "-".join(str(corpus[k]) for k in sorted(corpus))
    if args.clip_logit_scale is not None:
        corpus_tag += f"-scale{args.clip_logit_scale:g}"
    clip_path = args.workdir / f"clip-{args.n_train}-{args.clip_epochs}-{args.clip_steps}-{corpus_tag}.pt"
    if not clip_path.exists():
        (samples, maskable, darken), augment = toy_corpus_from_settings(world, corpus)
        train_clip(
            samples,
            maskable=maskable,
            darken=darken,
            augment=augment,
            fixed_logit_scale=args.clip_logit_scale,
            model_name=TOY_CLIP_CONFIG,
            epochs=args.clip_epochs,
            lr=TOY_FROM_SCRATCH["lr"],
            weight_decay=TOY_FROM_SCRATCH["weight_decay"],
            batch_size=min(128, args.n_train),
            max_steps=args.clip_steps,
            out_path=clip_path,
            progress=False,
        )
    clip_seconds = time.perf_counter() - started - world_seconds

    settings = settings_from_toy_preset(args)
    results = experiment.run_ablation(
        world, clip_path, seeds, settings, TOY_CLIP_CONFIG, verbose=args.verbose
    )
    summary = experiment.summarise(results["per_seed"])
    summary["seeds"] = seeds
    summary["settings"] = settings.to_dict()
    summary["clip"] = {"corpus": args.clip_corpus, **corpus, "fixed_logit_scale": args.clip_logit_scale}
    summary["class_background"] = dict(CLASS_BACKGROUND)
    summary["wall_seconds"] = {
        "world": round(world_seconds, 1),
        "clip": round(clip_seconds, 1),
        "total": round(time.perf_counter() - started, 1),
    }
    table = experiment.format_table(summary, len(seeds))
    args.workdir.mkdir(parents=True, exist_ok=True)
    grid_path = args.workdir / "ablation_overlays.png"
    overlay_grid(results, args.grid_rows).save(grid_path)
    (args.workdir / "ablation.md").write_text(table + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"\nCAM overlays ({', '.join(GRID_COLUMNS)}): {grid_path}")
    print(f"wall time {summary['wall_seconds']}")
    return summary


if __name__ == "__main__":
    main()
