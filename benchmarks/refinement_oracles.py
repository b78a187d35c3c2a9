"""Oracle checks of the refinement and segmentation stages: is it the algorithm or what the network learned?

Every row replaces one learned part of the pipeline by the ground truth and runs the pipeline's own code
(``clims_pipeline.random_walk``, the ``train_aff`` / ``make_rw`` / ``train_seg`` / ``eval_seg`` stages):

* **grid ceiling**: the ground-truth masks average-pooled to the random walk's grid
  (``train_aff.feature_stride``) and upsampled back the way the walk's scores are: the best any walk on that
  grid can do;
* **random walk, ground-truth affinities**: the walk with affinities computed from the masks
  (:func:`~clims_pipeline.random_walk.ground_truth_affinity_features`), applied to the trained CAMs and to
  CAMs degraded on purpose (blurred, shrunk, shifted): what a correct walk recovers from each;
* **AffinityNet on ground-truth labels**: ``train_aff`` with ``label_source=ground_truth``, then ``make_rw``;
  its gap to the row above is what learning costs, and the pipeline's row (labels from the CAMs) adds the cost
  of label noise;
* **segmentation on ground-truth masks**: ``train_seg`` with ``mask_source=ground_truth``, then ``eval_seg``:
  the segmentation stage's ceiling on this data; the pipeline's segmentation over its pseudo masks is the
  ratio the paper's pipeline keeps near 0.98.
* IRNet rows: :func:`irnet_rows` (empty until the IRNet stages exist).

With ``--workdir`` of a finished toy run (``python examples/voc_full_pipeline.py``) only the oracle stages are
trained, in ``--out`` (sub-directories that link the run's world and CAMs; the run itself is never written).
Without it the script runs the toy pipeline first, on a reduced world (``--n-train``), into ``--out/run``.

    python benchmarks/refinement_oracles.py --workdir runs/toyworld --split val
    python benchmarks/refinement_oracles.py --out runs/oracles          # clean clone: trains everything
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch

from clims_pipeline.cams import foreground_prediction, load_cam_file
from clims_pipeline.cli import main as pipeline_main
from clims_pipeline.cli import read_recorded_config
from clims_pipeline.config import PipelineConfig
from clims_pipeline.data import VOID_LABEL, SegmentationSource, build_source
from clims_pipeline.label_maps import read_label_png
from clims_pipeline.metrics import ThresholdSweep, confusion_matrix, iou_from_confusion, mean_iou
from clims_pipeline.plugins import load_plugins
from clims_pipeline.random_walk import (
    ground_truth_affinity_features,
    pad_to_stride,
    random_walk_labels,
)

#: What an oracle sub-run links from the run it checks (read only): the world, the CAMs and their networks.
LINKED = ("toyworld", "cache", "train_clip", "train_cam", "train_clims", "make_cam", "eval_cam")
THRESHOLDS = np.round(np.arange(0.01, 0.955, 0.01), 2)
PIPELINE_STAGES = "train_clip,train_cam,train_clims,make_cam,eval_cam,train_aff,make_rw,train_seg,eval_seg"

Degradation = Callable[[np.ndarray], np.ndarray]


def blurred(maps: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Gaussian blur of every map (``sigma`` pixels), peaks renormalised to 1 as make_cam's maps are."""
    out = scipy.ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma))
    peak = out.reshape(len(out), -1).max(axis=1).reshape(-1, 1, 1) if len(out) else 1.0
    return np.asarray(out / np.maximum(peak, 1e-5), dtype=np.float32)


def shrunk(maps: np.ndarray, size: int = 7) -> np.ndarray:
    """Grey erosion with a ``size`` x ``size`` window: every activated region loses ``size // 2`` pixels."""
    return np.asarray(scipy.ndimage.grey_erosion(maps, size=(1, size, size)), dtype=np.float32)


def shifted(maps: np.ndarray, pixels: int = 6) -> np.ndarray:
    """Maps moved ``pixels`` right and down (zeros enter from the top-left)."""
    return np.asarray(scipy.ndimage.shift(maps, (0, pixels, pixels), order=0, cval=0.0), dtype=np.float32)


DEGRADATIONS: dict[str, Degradation] = {
    "trained CAMs": lambda maps: maps,
    "blurred (sigma 3 px)": blurred,
    "shrunk (erosion 7 px)": shrunk,
    "shifted (6 px right, 6 down)": shifted,
}


def miou_percent(confusion: np.ndarray) -> float:
    return round(100 * mean_iou(iou_from_confusion(confusion)), 2)


def grid_ceiling(mask: np.ndarray, num_labels: int, stride: int) -> np.ndarray:
    """The mask pooled to the walk's grid and upsampled back (bilinear) as the walked scores are."""
    features = ground_truth_affinity_features(mask, num_labels, stride, contrast=1.0)
    size = pad_to_stride(torch.zeros(1, 1, *mask.shape), stride).shape[-2:]
    upsampled = torch.nn.functional.interpolate(
        features[None], size=size, mode="bilinear", align_corners=False
    )
    return upsampled[0, :, : mask.shape[0], : mask.shape[1]].argmax(dim=0).numpy().astype(np.uint8)


CamLoader = Callable[[str], dict[str, np.ndarray]]


def walk_oracle_rows(
    config: PipelineConfig, source: SegmentationSource, load_cams: CamLoader, image_ids: Sequence[str]
) -> list[tuple[str, float, str]]:
    """Grid ceiling, and per degradation: CAM mIoU (best background threshold) and the walk with ground-truth
    affinities (the run's make_rw settings). ``load_cams(image_id)`` gives make_cam's ``high_res`` and
    ``keys`` of an image."""
    num_labels = source.num_classes + 1
    stride = config.train_aff.feature_stride
    sweeps = {name: ThresholdSweep(num_labels, THRESHOLDS, void_label=VOID_LABEL) for name in DEGRADATIONS}
    walked = {name: np.zeros((num_labels, num_labels), dtype=np.int64) for name in DEGRADATIONS}
    ceiling = np.zeros((num_labels, num_labels), dtype=np.int64)
    for image_id in image_ids:
        mask = source.load_mask(image_id)
        image = np.asarray(source.load_image(image_id))
        cam = load_cams(image_id)
        features = ground_truth_affinity_features(mask, num_labels, stride)
        ceiling += confusion_matrix(mask, grid_ceiling(mask, num_labels, stride), num_labels, VOID_LABEL)
        for name, degrade in DEGRADATIONS.items():
            maps = degrade(cam["high_res"])
            sweeps[name].add(mask, *foreground_prediction({"high_res": maps, "keys": cam["keys"]}))
            labels = random_walk_labels(image, maps, cam["keys"], features, config.make_rw, stride)
            walked[name] += confusion_matrix(mask, labels, num_labels, VOID_LABEL)
    rows = [
        (f"grid ceiling: masks pooled to the stride-{stride} grid and upsampled", miou_percent(ceiling), "")
    ]
    for name in DEGRADATIONS:
        cam_miou = round(100 * float(np.nanmax(sweeps[name].miou_per_threshold())), 2)
        rw_miou = miou_percent(walked[name])
        rows.append((f"CAM, {name} (best threshold)", cam_miou, ""))
        rows.append(("  + RW with ground-truth affinities", rw_miou, f"{rw_miou - cam_miou:+.2f}"))
    return rows


def masks_miou(source: SegmentationSource, image_ids: Sequence[str], directory: Path) -> float:
    num_labels = source.num_classes + 1
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for image_id in image_ids:
        prediction = read_label_png(directory / f"{image_id}.png")
        confusion += confusion_matrix(source.load_mask(image_id), prediction, num_labels, VOID_LABEL)
    return miou_percent(confusion)


def linked_workdir(run: Path, directory: Path, extra: Sequence[str] = ()) -> Path:
    """A work directory whose world, CAMs (and ``extra`` stage outputs) are links to ``run``'s."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (*LINKED, *extra):
        link = directory / name
        if (run / name).exists() and not link.exists():
            link.symlink_to((run / name).resolve(), target_is_directory=True)
    return directory


def run_pipeline(workdir: Path, stages: str, settings: Sequence[str], extra: Sequence[str] = ()) -> None:
    args = ["--workdir", str(workdir), "--stages", stages, *extra]
    for setting in settings:
        args += ["--set", setting]
    started = time.perf_counter()
    pipeline_main(args)
    print(f"[oracles] {stages} in {workdir}: {time.perf_counter() - started:.0f} s", flush=True)


def rerun_args(run: Path) -> list[str]:
    """The checked run's own config and world: an oracle sub-run differs from it only in its oracle."""
    return ["--config", str(run / "config.json"), "--data-root", str(run / "toyworld")]


def affinity_oracle_rows(
    run: Path,
    out: Path,
    config: PipelineConfig,
    source: SegmentationSource,
    image_ids: Sequence[str],
) -> list[tuple[str, float, str]]:
    """AffinityNet trained on ground-truth affinity labels, then the walk; beside the run's own walk."""
    workdir = linked_workdir(run, out / "aff_ground_truth")
    run_pipeline(workdir, "train_aff,make_rw", ["train_aff.label_source=ground_truth"], rerun_args(run))
    oracle = masks_miou(source, image_ids, workdir / "make_rw" / "masks")
    pipeline = masks_miou(source, image_ids, run / "make_rw" / "masks")
    return [
        ("RW, AffinityNet trained on ground-truth affinity labels", oracle, ""),
        (
            "RW, AffinityNet trained on CAM affinity labels (the pipeline)",
            pipeline,
            f"{pipeline - oracle:+.2f}",
        ),
    ]


def segmentation_oracle_rows(
    run: Path, out: Path, config: PipelineConfig, split: str, pseudo: float
) -> list[tuple[str, float, str]]:
    """The segmentation stage on ground-truth masks (its ceiling) and on the run's pseudo masks."""
    sets = [f"eval_seg.split={split}"]
    truth = linked_workdir(run, out / "seg_ground_truth")
    run_pipeline(truth, "train_seg,eval_seg", [*sets, "train_seg.mask_source=ground_truth"], rerun_args(run))
    on_pseudo = linked_workdir(run, out / "seg_pseudo", extra=("train_seg", "make_rw"))
    run_pipeline(on_pseudo, "eval_seg", sets, rerun_args(run))
    ceiling = float(json.loads((truth / "results.json").read_text())["seg"]["miou"])
    achieved = float(json.loads((on_pseudo / "results.json").read_text())["seg"]["miou"])
    return [
        ("segmentation trained on ground-truth masks (ceiling)", ceiling, ""),
        (
            "segmentation trained on the pseudo masks (the pipeline)",
            achieved,
            f"{achieved / pseudo:.2f} x masks",
        ),
    ]


def irnet_rows(run: Path, out: Path, config: PipelineConfig) -> list[tuple[str, float, str]]:
    """IRNet's oracles (boundary labels from the masks, then its walk; segmentation on its pseudo labels).

    Empty until the pipeline has the ``train_irn`` / ``make_sem_seg`` stages; they would need a
    ``label_source=ground_truth`` setting like ``train_aff``'s and a function that turns masks into IRNet's
    boundary / displacement targets, so that the same three rows can be filled in here.
    """
    del run, out, config
    return []


def format_table(rows: Sequence[tuple[str, float, str]], title: str) -> str:
    lines = [title, "", "| check | mIoU | vs the line above |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.2f} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, help="a finished toy run (read only); default: run one in --out"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/refinement_oracles"), help="oracle sub-runs")
    parser.add_argument("--split", default="val", help="where to measure (choose settings on 'train')")
    parser.add_argument("--images", type=int, default=None, help="images of --split for the walk oracles")
    parser.add_argument("--n-train", type=int, default=2000, help="world size when no --workdir is given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="only the walk oracles (no training)")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_plugins()  # the toy world's config section and data source
    started = time.perf_counter()
    run = args.workdir
    if run is None:
        run = args.out / "run"
        run_pipeline(run, PIPELINE_STAGES, [f"toy_world.n_train={args.n_train}"], ["--seed", str(args.seed)])
    run = run.resolve()
    config = read_recorded_config(str(run / "config.json"))
    source = build_source(config.dataset, str(run / "toyworld"), run / "cache")
    image_ids = source.ids(args.split)
    walk_ids = image_ids[: args.images] if args.images else image_ids
    results = json.loads((run / "results.json").read_text())
    cam_dir = run / "make_cam" / resolve_run_cam_source(run)
    rows = walk_oracle_rows(
        config, source, lambda image_id: load_cam_file(cam_dir / f"{image_id}.npy"), walk_ids
    )
    if not args.skip_training:
        out = args.out.resolve()
        rows += affinity_oracle_rows(run, out, config, source, image_ids)
        pseudo = masks_miou(source, image_ids, run / "make_rw" / "masks")
        rows += segmentation_oracle_rows(run, out, config, args.split, pseudo)
        rows += irnet_rows(run, out, config)
    title = (
        f"Refinement oracles on the toy world, {args.split} ({len(walk_ids)} images for the walk rows, "
        f"{len(image_ids)} for the others); the run's results: CAM {results['cam']['miou']}, "
        f"RW {results['rw']['miou']}, seg {results['seg']['miou']} ({results['seg']['split']}); "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(format_table(rows, title))
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "rows": rows}, indent=2))
    return 0


def resolve_run_cam_source(run: Path) -> str:
    return "train_clims" if (run / "make_cam" / "train_clims").is_dir() else "train_cam"


if __name__ == "__main__":
    raise SystemExit(main())
