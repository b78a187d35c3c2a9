"""Command line of the CLIMS pipeline (``clims-pipeline``, ``examples/voc_full_pipeline.py``).

The command line only builds the run's :class:`~clims_pipeline.config.PipelineConfig` (preset, variant,
data set, flags, ``--set`` overrides, or ``--config`` of a recorded run), records it with its provenance in
``<workdir>/config.json`` and runs the selected stages; the stages see the config, never the arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import stages  # noqa: F401  (registers the stages)
from .clip_setup import resolve_backgrounds
from .config import (
    IMAGE_SIZES,
    PRESETS,
    VARIANTS,
    PipelineConfig,
    apply_override,
    build_config,
    config_from_dict,
)
from .context import STAGES, StageContext, ordered_stages
from .data import DATA_SOURCES, DatasetError, DataSourceSpec, data_source_spec
from .distributed import DistributedInfo, init_distributed, shutdown_distributed
from .files import read_json, sha256_file, write_json
from .networks import BACKBONES
from .plugins import load_plugins
from .runstate import changed_fields, describe_changes
from .simple_layout import LABEL_FILES

DEFAULT_STAGES = ("train_cam", "check_clip", "train_clims", "make_cam", "eval_cam")


def build_parser() -> argparse.ArgumentParser:
    stage_help = "; ".join(f"{s.name}: {s.help}" for s in sorted(STAGES.values(), key=lambda s: s.order))
    fallback = fallback_source()
    parser = argparse.ArgumentParser(
        prog="clims-pipeline",
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
        help="where every stage reads and writes its outputs"
        + (f" ({fallback.name} default: {fallback.default_workdir})" if fallback else ""),
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DATA_SOURCES),
        help="default: voc with --voc-root, coco with --coco-root"
        + (f", else {fallback.name} (made in the workdir)" if fallback else ""),
    )
    parser.add_argument("--data-root", help="the data set's directory (see --dataset)")
    parser.add_argument(
        "--voc-root", help="VOCdevkit, VOCdevkit/VOC2012, or a directory holding JPEGImages/ etc."
    )
    parser.add_argument("--coco-root", help="COCO 2014 root with train2014/, val2014/, annotations/")
    parser.add_argument(
        "--config",
        help="a recorded run's config.json (or a JSON object of config sections): rerun it; flags and --set "
        "still apply on top",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="full: nothing beyond --image-size (default for real data); smoke: tiny networks and crops for "
        "a CPU check"
        + "".join(f"; {s.default_preset}: {s.name}'s default" for s in DATA_SOURCES.values() if s.fallback),
    )
    parser.add_argument(
        "--image-size",
        choices=tuple(IMAGE_SIZES),
        help="network and size settings, with any data set: paper (ResNet-50, 512-pixel crops) or small "
        "(images of about 64 pixels: 64-pixel crops, the small backbone); default: the preset's (toy: small)",
    )
    parser.add_argument(
        "--classes",
        help="the data set's class file: a class list (one class a line, optionally 'name: prompt words') "
        "or a registry JSON; default: the data root's classes.txt / classes.json, else the data set's own "
        "classes",
    )
    parser.add_argument(
        "--prompts",
        help="train_clims prompt registry: a clims_loss preset name, a registry JSON file, or 'dataset' (the "
        "class file's); default: the data set's (VOC: the variant's preset)",
    )
    parser.add_argument(
        "--template",
        help='object prompt template with one {}, e.g. "a photo of a {}." (default: the registry\'s)',
    )
    parser.add_argument(
        "--write-registry",
        metavar="FILE",
        help="write the run's prompt registry (classes, template, backgrounds, loss recipe) as editable JSON "
        "to FILE and exit; pass it back with --prompts FILE",
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        help="CLIMS recipe: paper (camera-ready, the default) or official (improved repository version)",
    )
    parser.add_argument("--train-split", help="training list (default: train_aug; smoke preset: train)")
    parser.add_argument("--eval-split", help="CAM evaluation list (default: train, the 1,464 images)")
    parser.add_argument(
        "--cam-source",
        choices=("auto", "train_cam", "train_clims"),
        help="which network make_cam/eval_cam use (auto: train_clims when available)",
    )
    parser.add_argument(
        "--cam-limit", type=int, help="make_cam/eval_cam: only the first N images of each split"
    )
    parser.add_argument(
        "--cam-eval-only",
        action="store_true",
        help="make_cam: infer the evaluation split only, not the training split (which train_aff needs)",
    )
    parser.add_argument("--backbone", choices=BACKBONES, help="CAM network backbone (default by image size)")
    parser.add_argument(
        "--backbone-weights", help="imagenet (torchvision), none (random init) or a local state-dict file"
    )
    parser.add_argument("--clip", help="open_clip model name (default ViT-B-32; smoke: a tiny random ViT)")
    parser.add_argument(
        "--clip-pretrained", help="open_clip tag (openai, ...), a local checkpoint file, or none"
    )
    parser.add_argument(
        "--clip-config",
        help="an extra open_clip model-config JSON to register (its file stem is a model name for --clip)",
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
        help="override any config field, e.g. --set train_cam.batch_size=8 (repeatable; the value is checked "
        "against the field's type)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        help="torch intra-op threads per process (default: 1 for the smoke preset on CPU, whose tiny "
        "networks only lose time to thread synchronisation; torch's default otherwise)",
    )
    parser.add_argument("--seed", type=int, help="random seed of every stage (default 0)")
    parser.add_argument("--force", action="store_true", help="redo the requested stages even if finished")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def fallback_source() -> DataSourceSpec | None:
    """The data source that runs without a data set (a plug-in's generated data), if one is registered."""
    return next((spec for spec in DATA_SOURCES.values() if spec.fallback), None)


def resolve_run_defaults(args: argparse.Namespace, recorded: PipelineConfig | None) -> DataSourceSpec:
    """Fill in the data set, its root, preset, work directory and stages that the flags leave open."""
    if args.voc_root or args.coco_root:
        # --voc-root is any VOC-layout root (VOC itself, or a plug-in's data in that layout).
        given = "voc" if args.voc_root else "coco"
        if args.dataset is not None and (args.dataset == "coco") != (given == "coco"):
            raise SystemExit(
                f"clims-pipeline: error: --{given}-root does not go with --dataset {args.dataset}; "
                "use --data-root"
            )
        args.dataset, args.data_root = args.dataset or given, args.voc_root or args.coco_root
    if args.dataset is None:
        if recorded is not None:
            args.dataset = recorded.dataset
        elif args.data_root:
            args.dataset = "simple" if is_simple_layout(Path(args.data_root)) else "voc"
        else:
            fallback = fallback_source()
            if fallback is None:
                raise SystemExit(
                    "clims-pipeline: error: name a data set (--voc-root, --coco-root or --data-root)"
                )
            args.dataset = fallback.name
    spec = data_source_spec(args.dataset)
    if args.preset is None:
        args.preset = recorded.preset if recorded is not None else spec.default_preset
    if args.variant is None:
        args.variant = recorded.variant if recorded is not None else "paper"
    if args.workdir is None:
        if spec.default_workdir is None and getattr(args, "write_registry", None):
            args.workdir = os.getcwd()  # only --backgrounds mined reads it
        elif spec.default_workdir is None:
            raise SystemExit(f"clims-pipeline: error: --workdir is required with --dataset {spec.name}")
        else:
            args.workdir = spec.default_workdir
    if not args.data_root and recorded is not None and recorded.data.root:
        args.data_root = recorded.data.root
    if not args.data_root and spec.default_root is not None:
        args.data_root = str(spec.default_root(Path(os.path.abspath(args.workdir))))
    if spec.default_stages is not None and args.stages == ",".join(DEFAULT_STAGES):
        args.stages = ",".join(spec.default_stages)
    return spec


def is_simple_layout(root: Path) -> bool:
    """A folder with images/ and a label file (labels.csv / labels.jsonl): the simple layout."""
    return (root / "images").is_dir() and any((root / name).is_file() for name in LABEL_FILES)


def read_recorded_config(path: str) -> PipelineConfig:
    """``--config``: a run's ``config.json`` (its ``config`` entry) or a bare JSON object of sections."""
    try:
        recorded = read_json(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"clims-pipeline: error: --config {path}: cannot read it as JSON: {error}") from None
    values = recorded.get("config", recorded) if isinstance(recorded, dict) else recorded
    try:
        return config_from_dict(values)
    except ValueError as error:
        raise SystemExit(f"clims-pipeline: error: --config {path}: {error}") from None


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    recorded = read_recorded_config(args.config) if args.config else None
    resolve_run_defaults(args, recorded)
    if recorded is not None and (args.preset, args.variant, args.dataset, args.image_size) == (
        recorded.preset,
        recorded.variant,
        recorded.dataset,
        args.image_size and recorded.image_size,
    ):
        config = recorded
    else:
        config = build_config(args.preset, args.variant, args.dataset, args.image_size)
    direct = {
        "seed": args.seed,
        "amp": True if args.amp else None,
        "data.root": os.path.abspath(args.data_root) if args.data_root else None,
        "data.train_split": args.train_split,
        "data.eval_split": args.eval_split,
        "data.num_workers": args.num_workers,
        "data.classes": os.path.abspath(args.classes) if args.classes else None,
        "train_clims.prompts": os.path.abspath(args.prompts)
        if args.prompts and Path(args.prompts).is_file()
        else args.prompts,
        "train_clims.template": args.template,
        "make_cam.source": args.cam_source,
        "make_cam.limit": args.cam_limit,
        "make_cam.include_train": False if args.cam_eval_only else None,
        "network.backbone": args.backbone,
        "network.weights": args.backbone_weights,
        "train_clims.clip": args.clip,
        "train_clims.clip_pretrained": args.clip_pretrained,
        "train_clims.clip_config": os.path.abspath(args.clip_config) if args.clip_config else None,
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


def changed_settings(old: object, new: object) -> list[str]:
    """Dotted names of the config fields whose values differ between two config dumps."""
    return changed_fields(old, new)


def warn_about_changed_settings(
    ctx_print: Callable[[str], None], config_path: Path, config: PipelineConfig
) -> None:
    """Say which settings differ from the run recorded in the work directory (its stages whose inputs changed
    are recomputed; the others are reused)."""
    if not config_path.is_file():
        return
    try:
        previous = read_json(config_path).get("config", {})
    except (OSError, ValueError):
        return
    changed = changed_settings(previous, json.loads(json.dumps(config.to_dict())))
    if changed:
        ctx_print(
            f"[pipeline] {config_path} was written with other settings ({describe_changes(changed, 8)}); "
            "finished stages that depend on them are recomputed, the others reused (--force redoes all)."
        )


def provenance(config: PipelineConfig) -> dict[str, Any]:
    """What a rerun needs besides the config: package versions, source commit, hashes of the files read."""
    packages: dict[str, str | None] = {}
    for name in ("clims-loss", "torch", "torchvision", "open_clip_torch", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    try:
        commit: str | None = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    named = {
        "network.weights": config.network.weights,
        "train_aff.weights": config.train_aff.weights,
        "train_seg.weights": config.train_seg.weights,
        "train_clims.clip_pretrained": config.train_clims.clip_pretrained,
        "train_clims.clip_config": config.train_clims.clip_config,
        "train_clims.backgrounds": config.train_clims.backgrounds,
        "train_clip.pretrained": config.train_clip.pretrained,
        "mine_backgrounds.vocabulary": config.mine_backgrounds.vocabulary,
    }
    files = {
        field: {
            "path": str(Path(value).expanduser().resolve()),
            "sha256": sha256_file(Path(value).expanduser()),
        }
        for field, value in named.items()
        if value and Path(value).expanduser().is_file()
    }
    return {"packages": packages, "python": sys.version.split()[0], "commit": commit, "files": files}


def write_registry(config: PipelineConfig, workdir: Path, path: Path) -> int:
    """``--write-registry FILE``: the registry the run's train_clims would use (class set or preset, the
    recipe flags, ``--backgrounds``) as editable JSON; ``--prompts FILE`` reads it back."""
    ctx = StageContext(config=config, workdir=workdir, device=torch.device("cpu"), dist=DistributedInfo())
    try:
        registry, _ = resolve_backgrounds(ctx)
    except (ValueError, FileNotFoundError, DatasetError) as error:
        raise SystemExit(f"clims-pipeline: error: --write-registry: {error}") from None
    assert registry is not None  # must_exist=True returns a registry or raises
    path.parent.mkdir(parents=True, exist_ok=True)
    registry.to_json(path)
    print(
        f"[pipeline] wrote the prompt registry of {config.dataset} at {config.data.root} to {path}: "
        f"{registry.num_classes} classes, object prompts {registry.object_prompts()[:3]}"
        f"{' ...' if registry.num_classes > 3 else ''}, {len(registry.background_terms())} background terms. "
        f"Edit it and train with --prompts {path}"
    )
    return 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def selected_stage_names(text: str, config: PipelineConfig) -> list[str]:
    if text in ("", "default"):
        return list(DEFAULT_STAGES)
    if text == "all":
        return [n for n in sorted(STAGES, key=lambda n: STAGES[n].order) if STAGES[n].in_all(config)]
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    load_plugins()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args)
    except ValueError as error:  # a bad --set, flag value or preset: a usage error, not a traceback
        parser.error(str(error))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.write_registry:
        return write_registry(config, Path(os.path.abspath(args.workdir)), Path(args.write_registry))
    selected = ordered_stages(selected_stage_names(args.stages, config))
    spec = data_source_spec(config.dataset)

    dist_info, device = init_distributed(args.device)
    threads_before = torch.get_num_threads()  # restored on exit, for callers that run main() in-process
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    elif config.preset == "smoke" and device.type == "cpu":
        # Measured on 2 cores: the smoke run's train_cam took 10.8 s with 2 threads and 0.5 s with 1. The toy
        # preset's networks are large enough to gain: its main command took 9 min 2 s with 1 thread and
        # 6 min 9 s with torch's default (2) on an otherwise idle 2-core machine.
        torch.set_num_threads(1)
    ctx = StageContext(
        config=config,
        workdir=Path(os.path.abspath(args.workdir)),
        device=device,
        dist=dist_info,
        force=args.force,
        requested_stages=[s.name for s in selected],
    )
    try:
        seed_everything(config.seed)
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
                    "provenance": provenance(config),
                },
            )
        ctx.print(
            f"[pipeline] stages {[s.name for s in selected]} | preset {config.preset} | variant "
            f"{config.variant} | {config.dataset} | device {device} | processes {dist_info.world_size} | "
            f"workdir {ctx.workdir}"
        )
        if spec.prepare is not None:
            spec.prepare(ctx)
        # Check every input the selected stages will read before the first one starts.
        ctx.begin_preflight()
        try:
            for stage in selected:
                stage.preflight(ctx)
        except Exception as error:
            ctx.end_preflight(also=error)  # the data problems found so far come first, with this error
            raise
        ctx.end_preflight()
        for stage in selected:
            started = time.perf_counter()
            stage.run(ctx)
            ctx.print(f"[pipeline] {stage.name} finished in {time.perf_counter() - started:.1f} s")
    finally:
        torch.set_num_threads(threads_before)
        ctx.close()
        shutdown_distributed()
    return 0
