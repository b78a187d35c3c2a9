"""Command line of the CLIMS example pipeline (``examples/voc_full_pipeline.py``)."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import stages  # noqa: F401  (registers the stages)
from .config import DATASETS, PRESETS, VARIANTS, PipelineConfig, apply_override, build_config
from .context import STAGES, StageContext, ordered_stages
from .distributed import init_distributed, shutdown_distributed
from .files import read_json, write_json
from .toy.pipeline import DEFAULT_TOY_WORKDIR, TOY_STAGES, ensure_toy_world, toy_world_root

DEFAULT_STAGES = ("train_cam", "train_clims", "make_cam", "eval_cam")


def build_parser() -> argparse.ArgumentParser:
    stage_help = "; ".join(f"{s.name}: {s.help}" for s in sorted(STAGES.values(), key=lambda s: s.order))
    parser = argparse.ArgumentParser(
        prog="voc_full_pipeline.py",
        description="Reproduce CLIMS (CVPR 2022): baseline CAM -> CLIMS CAM -> ..., mIoU after each stage. "
        "Run with python (one process) or torchrun --nproc_per_node=N (DDP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated stages, or 'all'. Stages: {stage_help}",
    )
    parser.add_argument(
        "--workdir",
        help=f"where every stage reads and writes its outputs (toy world default: {DEFAULT_TOY_WORKDIR})",
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        help="default: voc with --voc-root, coco with --coco-root, else toy (generated in the workdir)",
    )
    parser.add_argument(
        "--voc-root", help="VOCdevkit, VOCdevkit/VOC2012, or a directory holding JPEGImages/ etc."
    )
    parser.add_argument("--coco-root", help="COCO 2014 root with train2014/, val2014/, annotations/")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        help="full: the paper's sizes (default); smoke: tiny networks and crops for a CPU check; "
        "toy: the toy world's (default with --dataset toy)",
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="paper",
        help="CLIMS recipe: paper (camera-ready) or official (improved repository version)",
    )
    parser.add_argument("--train-split", help="training list (default: train_aug; smoke preset: train)")
    parser.add_argument("--eval-split", help="CAM evaluation list (default: train, the 1,464 images)")
    parser.add_argument(
        "--cam-source",
        choices=("auto", "train_cam", "train_clims"),
        help="which network make_cam/eval_cam use (auto: train_clims when available)",
    )
    parser.add_argument("--backbone", choices=("resnet50", "tiny"), help="backbone (default by preset)")
    parser.add_argument(
        "--backbone-weights", help="imagenet (torchvision), none (random init) or a local state-dict file"
    )
    parser.add_argument("--clip", help="open_clip model name (default ViT-B-32; smoke: a tiny random ViT)")
    parser.add_argument(
        "--clip-pretrained", help="open_clip tag (openai, ...), a local checkpoint file, or none"
    )
    parser.add_argument(
        "--clip-config",
        help="an extra open_clip model-config JSON to register (its file stem "
        "becomes a model name for --clip)",
    )
    parser.add_argument(
        "--backgrounds",
        help="train_clims background prompts: preset (the variant's, default), mined (the file stage "
        "mine_backgrounds writes) or a registry JSON file (its backgrounds replace the variant's)",
    )
    parser.add_argument("--mine-top-l", type=int, help="mine_backgrounds: at most this many terms per class")
    parser.add_argument("--mine-margin", type=float, help="mine_backgrounds: a term's score must exceed this")
    parser.add_argument(
        "--mine-vocabulary",
        help="mine_backgrounds: candidate terms, one per line (default: clims_loss's ~150 stuff terms)",
    )
    parser.add_argument("--epochs-cam", type=int, help="override train_cam.train epochs")
    parser.add_argument("--epochs-clims", type=int, help="override train_clims epochs")
    parser.add_argument("--num-workers", type=int, help="data-loader workers per process")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set train_cam.batch_size=8 (repeatable)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        help="torch intra-op threads per process (default: 1 for the smoke preset on CPU, whose tiny "
        "networks only lose time to thread synchronisation; torch's default otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="redo the requested stages even if finished")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def resolve_dataset_defaults(args: argparse.Namespace) -> None:
    """No data set root: the toy world, generated in the work directory (docs/toyworld.md)."""
    if args.dataset is None:
        args.dataset = "voc" if args.voc_root else "coco" if args.coco_root else "toy"
    if args.preset is None:
        args.preset = "toy" if args.dataset == "toy" else "full"
    if args.workdir is None:
        if args.dataset != "toy":
            raise SystemExit("voc_full_pipeline.py: error: --workdir is required with --dataset voc/coco")
        args.workdir = DEFAULT_TOY_WORKDIR
    if args.dataset == "toy":
        if args.voc_root is None:
            args.voc_root = str(toy_world_root(Path(os.path.abspath(args.workdir))))
        if args.stages == ",".join(DEFAULT_STAGES):
            args.stages = ",".join(TOY_STAGES)


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    resolve_dataset_defaults(args)
    config = build_config(args.preset, args.variant, args.dataset)
    direct = {
        "data.train_split": args.train_split,
        "data.eval_split": args.eval_split,
        "data.num_workers": args.num_workers,
        "make_cam.source": args.cam_source,
        "network.backbone": args.backbone,
        "network.weights": args.backbone_weights,
        "train_clims.clip": args.clip,
        "train_clims.clip_pretrained": args.clip_pretrained,
        "train_clims.backgrounds": args.backgrounds,
        "mine_backgrounds.top_l": args.mine_top_l,
        "mine_backgrounds.margin": args.mine_margin,
        "mine_backgrounds.vocabulary": args.mine_vocabulary,
        "train_cam.epochs": args.epochs_cam,
        "train_clims.train.epochs": args.epochs_clims,
    }
    for key, value in direct.items():
        if value is not None:
            apply_override(config, f"{key}={json.dumps(value)}")
    for text in args.set:
        apply_override(config, text)
    return config


def changed_settings(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted names of the config fields whose values differ between two config dumps of the same form
    (both read back from JSON, or both ``config.to_dict()``); a field present in only one of them counts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                changed.append(name)
            else:
                changed += changed_settings(old[key], new[key], name)
        return changed
    return [] if old == new else [prefix]


def warn_about_changed_settings(
    ctx_print: Callable[[str], None], config_path: Path, config: PipelineConfig
) -> None:
    """Finished stages are reused as they are; say so when the work directory's settings were different."""
    if not config_path.is_file():
        return
    try:
        previous = read_json(config_path).get("config", {})
    except (OSError, ValueError):
        return
    # The file holds JSON (tuples read back as lists): compare with the current config in the same form.
    changed = changed_settings(previous, json.loads(json.dumps(config.to_dict())))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        ctx_print(
            f"[pipeline] warning: {config_path} was written with other settings ({shown}); stages that "
            "finished with them are reused as they are. Use --force (or a new --workdir) to redo them."
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    names = (
        list(DEFAULT_STAGES)
        if args.stages in ("", "default")
        else (
            sorted(STAGES, key=lambda n: STAGES[n].order)
            if args.stages == "all"
            else [name.strip() for name in args.stages.split(",") if name.strip()]
        )
    )
    selected = ordered_stages(names)

    dist_info, device = init_distributed(args.device)
    threads_before = torch.get_num_threads()  # restored on exit, for callers that run main() in-process
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    elif config.preset == "smoke" and device.type == "cpu":
        # Measured on 2 cores: the smoke run's train_cam took 10.8 s with 2 threads and 0.5 s with 1. The toy
        # preset's networks are large enough to gain: its main command took 9 min 2 s with 1 thread and
        # 6 min 9 s with torch's default (2) on an otherwise idle 2-core machine.
        torch.set_num_threads(1)
    workdir = os.path.abspath(args.workdir)
    ctx = StageContext(
        args=args,
        config=config,
        workdir=Path(workdir),
        device=device,
        dist=dist_info,
        seed=args.seed,
        amp=args.amp,
        force=args.force,
        requested_stages=[s.name for s in selected],
    )
    try:
        seed_everything(args.seed)
        if dist_info.is_main:
            ctx.workdir.mkdir(parents=True, exist_ok=True)
            if not args.force:
                warn_about_changed_settings(ctx.print, ctx.workdir / "config.json", config)
            write_json(
                ctx.workdir / "config.json",
                {
                    "argv": list(sys.argv if argv is None else argv),
                    "world_size": dist_info.world_size,
                    "device": str(device),
                    "config": config.to_dict(),
                },
            )
        ctx.print(
            f"[pipeline] stages {[s.name for s in selected]} | preset {config.preset} | variant "
            f"{config.variant} | {config.dataset} | device {device} | processes {dist_info.world_size} | "
            f"workdir {ctx.workdir}"
        )
        if config.dataset == "toy":
            ensure_toy_world(ctx)
        # Check every input the selected stages will read before the first one starts.
        for stage in selected:
            if stage.preflight is not None:
                stage.preflight(ctx)
        for stage in selected:
            started = time.perf_counter()
            stage.run(ctx)
            ctx.print(f"[pipeline] {stage.name} finished in {time.perf_counter() - started:.1f} s")
    finally:
        torch.set_num_threads(threads_before)
        ctx.close()
        shutdown_distributed()
    return 0
