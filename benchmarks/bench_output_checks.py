"""What the hash check of per-image outputs costs next to reading the file it guards.

Every per-image output a later stage reads (a CAM ``.npy`` of ``make_cam``, a label PNG of ``train_aff``,
``make_rw`` or ``eval_seg``) is checked by ``clims_pipeline.runstate.verify_file`` against the size and
sha256 its manifest recorded. This script times, per file and with the file in the page cache (as it is
right after the stage wrote it, and on every later read):

* ``hash``: ``sha256_file`` alone;
* ``verify``: ``verify_file`` on a fresh process cache (manifest look-up, stat, hash);
* ``read``: what the reader does with the file anyway (``np.load`` of a CAM file, the PNG decode of a
  label map);

and prints the per-file times and the ratios ``hash / read`` and ``verify / read``.

The CAM files come from a tiny run on the VOC sample (``train_cam`` for 2 steps, ``make_cam`` at scale 1.0:
the files have the real image sizes, which is what the hash cost depends on), or from ``--workdir``, a
workdir of an earlier run. The label PNGs are the sample's ground-truth masks (palette PNGs of the same
kind and size as the pseudo masks), given a manifest of sizes and hashes as ``finish_files`` writes it.

Run ``python benchmarks/bench_output_checks.py [--voc-root DIR] [--workdir DIR] [--json out.json]``.
This is a measurement, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clims_pipeline import runstate
from clims_pipeline.files import sha256_file, write_json

DEFAULT_VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012_sample"
TINY_RUN = (
    "--preset=smoke",
    "--stages=train_cam,make_cam",
    "--cam-source=train_cam",
    "--set=train_cam.max_steps=2",
    "--set=train_cam.batch_size=4",
    "--set=data.crop_size=32",
    "--set=make_cam.scales=[1.0]",
    "--seed=3",
)


def per_file_seconds(files: list[Path], action: Callable[[Path], Any], repeats: int) -> float:
    """The median over ``repeats`` passes of the mean time per file of ``action``."""
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        for path in files:
            action(path)
        passes.append((time.perf_counter() - started) / len(files))
    return statistics.median(passes)


def fresh_verify(path: Path) -> None:
    runstate._VERIFIED.clear()  # time the hash every call, as the first read in a process pays it
    runstate.verify_file(path)


def read_cam(path: Path) -> None:
    np.load(path, allow_pickle=True).item()


def read_png(path: Path) -> None:
    with Image.open(path) as image:
        np.array(image, dtype=np.uint8)


def measure(kind: str, files: list[Path], read: Callable[[Path], Any], repeats: int) -> dict[str, Any]:
    for path in files:  # warm the page cache (and check every file is vouched for)
        read(path)
        fresh_verify(path)
    hash_s = per_file_seconds(files, sha256_file, repeats)
    verify_s = per_file_seconds(files, fresh_verify, repeats)
    read_s = per_file_seconds(files, read, repeats)
    return {
        "kind": kind,
        "files": len(files),
        "mean_bytes": int(np.mean([path.stat().st_size for path in files])),
        "hash_ms": 1e3 * hash_s,
        "verify_ms": 1e3 * verify_s,
        "read_ms": 1e3 * read_s,
        "hash_over_read": hash_s / read_s,
        "verify_over_read": verify_s / read_s,
    }


def cam_files(voc_root: Path, workdir: Path | None, scratch: Path) -> list[Path]:
    if workdir is None:
        from clims_pipeline.cli import main as run_pipeline

        workdir = scratch / "run"
        status = run_pipeline(["--voc-root", str(voc_root), "--workdir", str(workdir), *TINY_RUN])
        if status != 0:
            raise SystemExit(f"the tiny run on {voc_root} failed ({status})")
    files = sorted((workdir / "make_cam").glob("*/*.npy"))
    if not files:
        raise SystemExit(f"no CAM files in {workdir / 'make_cam'}: run make_cam there first")
    return files


def label_files(voc_root: Path, scratch: Path) -> list[Path]:
    """The sample's masks copied into an output directory with a manifest as finish_files writes it."""
    directory = scratch / "labels"
    directory.mkdir()
    for mask in sorted((voc_root / "SegmentationClass").glob("*.png")):
        shutil.copyfile(mask, directory / mask.name)
    files = sorted(directory.glob("*.png"))
    write_json(
        directory / runstate.MANIFEST,
        {
            "stage": "benchmark",
            "complete": True,
            "sizes": {path.name: path.stat().st_size for path in files},
            "sha256": {path.name: sha256_file(path) for path in files},
        },
    )
    return files


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--voc-root", type=Path, default=Path(os.environ.get("CLIMS_VOC_SAMPLE", DEFAULT_VOC))
    )
    parser.add_argument(
        "--workdir", type=Path, help="a workdir whose make_cam output to time (default: a tiny run)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        cams = cam_files(args.voc_root, args.workdir, Path(scratch))
        rows = [
            measure("CAM .npy", cams, read_cam, args.repeats),
            measure("label .png", label_files(args.voc_root, Path(scratch)), read_png, args.repeats),
        ]
    load = os.getloadavg()
    print(f"per-image output checks, page cache warm, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        f"{'kind':<11} {'files':>5} {'KiB':>7} {'hash ms':>8} {'verify ms':>9} {'read ms':>8} "
        f"{'hash/read':>9} {'verify/read':>11}"
    )
    for row in rows:
        print(
            f"{row['kind']:<11} {row['files']:>5} {row['mean_bytes'] / 1024:>7.0f} {row['hash_ms']:>8.3f} "
            f"{row['verify_ms']:>9.3f} {row['read_ms']:>8.3f} {row['hash_over_read']:>9.2f} "
            f"{row['verify_over_read']:>11.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"load_average": load, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
