"""``python -m clims_pipeline.toy``: generate a toy world (and optionally train its tiny CLIP and report what
it learned)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ..clip_training import train_clip
from ..files import write_json
from .clip import TOY_CLIP_CONFIG, format_report, toy_clip_corpus, zero_shot_report
from .world import DEFAULT_N_TRAIN, DEFAULT_N_VAL, TOY_WORLD_KINDS, generate_toy_world


def main(argv: Sequence[str] | None = None) -> None:
    """Measurement entry point: generate the world, train the tiny CLIP, report accuracy and bias."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", type=Path, help="directory to write the toy world into")
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN)
    parser.add_argument("--n-val", type=int, default=DEFAULT_N_VAL)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kind", choices=TOY_WORLD_KINDS, default="first", help="which world (docs/toyworld.md)"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--train-clip",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="also train the tiny CLIP on the captions and save it here",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    metadata = generate_toy_world(
        args.root,
        n_train=args.n_train,
        n_val=args.n_val,
        image_size=args.image_size,
        seed=args.seed,
        kind=args.kind,
        num_workers=args.workers,
        overwrite=args.overwrite,
    )
    print(
        f"toy world at {args.root}: {metadata['splits']} in {time.perf_counter() - started:.1f} s "
        f"(generation itself {metadata['generation_seconds']} s with {metadata['num_workers']} worker(s))"
    )
    stats = metadata["statistics"]
    print(f"instance co-occurrence rate per class: {stats['instance_context_rate']}")
    print(f"image co-occurrence rate per class:    {stats['image_context_rate']}")
    print(
        f"objects per image {stats['objects_per_image']}, classes per image {stats['classes_per_image']}, "
        f"JPEG mean abs error {metadata['jpeg_mean_abs_error']} grey levels"
    )
    if args.train_clip is None:
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train_samples, maskable, _ = toy_clip_corpus(args.root, seed=args.seed)
    started = time.perf_counter()
    train_clip(
        train_samples,
        maskable=maskable,
        model_name=TOY_CLIP_CONFIG,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        out_path=args.train_clip,
    )
    train_seconds = time.perf_counter() - started
    print(f"tiny CLIP trained in {train_seconds:.1f} s -> {args.train_clip}")
    started = time.perf_counter()
    report = zero_shot_report(args.root, model_name=TOY_CLIP_CONFIG, pretrained=args.train_clip)
    print(format_report(report))
    print(f"(report in {time.perf_counter() - started:.1f} s)")
    report["wall_seconds"] = {
        "generation": metadata["generation_seconds"],
        "clip_training": round(train_seconds, 1),
        "report": round(time.perf_counter() - started, 1),
    }
    report["torch_threads"] = torch.get_num_threads()
    report_path = args.train_clip.with_name(args.train_clip.name + ".report.json")
    write_json(report_path, report)
    print(f"report written to {report_path}")


main()
