"""Does the toy recipe transfer? Baseline CAM vs full CLIMS on each toy world, same preset, several seeds.

For every world (``--worlds first,second``; ``toy_world.kind``) the script runs the pipeline command line
as a user would (docs/toyworld.md):

1. ``<workdir>/<world>/clip``: the world is generated and its tiny CLIP trained (stage ``train_clip`` of the
   ``toy`` preset). One CLIP per world: ``train_clip`` trains with seed 0 whatever the pipeline's seed.
2. ``<workdir>/<world>/seed<s>`` for each seed: the same world (``--data-root``) and a copy of that CLIP;
   stages ``train_cam`` and ``train_clims`` with ``--seed s``, then ``make_cam`` and ``eval_cam`` once for the
   baseline network (``--cam-source train_cam``, results key ``cam_baseline``) and once for the CLIMS
   network (``cam``). CAMs are inferred for the evaluation split only (``--train-split val`` in those two
   calls): the training split's CAMs feed refinement, which is not run here.

Every setting is the ``toy`` preset's; nothing is tuned per world. It prints, per world, CAM mIoU on ``val``
(mean ± std over seeds) of both networks and the per-class IoU, and names the *collapsed* classes: a class
whose CLIMS IoU in a seed is below half its baseline IoU in that seed, or 0. Finished stages are reused
(the pipeline's run state), so a rerun only prints the tables.

    python benchmarks/toyworld_transfer.py --workdir runs/transfer --json transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: A class collapses in a seed when its CLIMS IoU falls below this share of its baseline IoU (or is 0).
COLLAPSE_SHARE = 0.5


def pipeline(argv: Sequence[str], log: Path) -> float:
    """Run ``python -m clims_pipeline`` with ``argv`` (output appended to ``log``); its wall time."""
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ python -m clims_pipeline {' '.join(argv)}\n")
        handle.flush()
        done = subprocess.run(
            [sys.executable, "-m", "clims_pipeline", *argv], stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise SystemExit(f"the pipeline failed ({done.returncode}): {' '.join(argv)}; see {log}")
    return time.perf_counter() - started


def world_flags(world: str) -> list[str]:
    return ["--set", f"toy_world.kind={world}"]


def run_world(
    workdir: Path, world: str, seeds: Sequence[int], extra: Sequence[str], clip_from: Path | None = None
) -> dict[str, Any]:
    """The CLIP of one world, then baseline and CLIMS per seed; results.json of each seed and timings.

    ``clip_from``: a finished ``train_clip`` output of the same world (e.g. of the main command's run) to
    use instead of training one; the world is then generated here, as the pipeline would."""
    base = workdir / world
    base.mkdir(parents=True, exist_ok=True)
    log = base / "pipeline.log"
    clip_dir = base / "clip"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if clip_from is None:
        pipeline(["--workdir", str(clip_dir), "--stages", "train_clip", *world_flags(world), *extra], log)
    else:
        from clims_pipeline.toy.world import generate_toy_world

        generate_toy_world(clip_dir / "toyworld", kind=world, progress=False)
        if not (clip_dir / "train_clip").exists():
            shutil.copytree(clip_from, clip_dir / "train_clip")
    timings["world+clip"] = time.perf_counter() - started
    print(f"[transfer] {world}: world and CLIP in {timings['world+clip']:.0f} s", flush=True)
    results: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        run = base / f"seed{seed}"
        run.mkdir(exist_ok=True)
        if not (run / "train_clip").exists():
            shutil.copytree(clip_dir / "train_clip", run / "train_clip")
        common = ["--workdir", str(run), "--dataset", "toy", "--data-root", str(clip_dir / "toyworld")]
        common += ["--seed", str(seed), *extra]
        seconds = pipeline([*common, "--stages", "train_cam,train_clims"], log)
        for source in ("train_cam", "train_clims"):
            seconds += pipeline(
                [*common, "--stages", "make_cam,eval_cam", "--cam-source", source, "--train-split", "val"],
                log,
            )
        timings[f"seed{seed}"] = seconds
        results[seed] = json.loads((run / "results.json").read_text())
        print(
            f"[transfer] {world} seed {seed}: baseline {results[seed]['cam_baseline']['miou']:.2f}, "
            f"CLIMS {results[seed]['cam']['miou']:.2f} ({seconds:.0f} s)",
            flush=True,
        )
    return {"results": results, "seconds": timings}


def finished_seeds(base: Path, seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The results of the seeds under ``base`` that have both the baseline and the CLIMS CAM evaluated."""
    found = {}
    for seed in seeds:
        path = base / f"seed{seed}" / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        if "cam" in results and "cam_baseline" in results:
            found[seed] = results
    return found


def summarise(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of both networks, per-class means, and the collapsed classes per seed."""
    seeds = sorted(results)
    classes = [c for c in results[seeds[0]]["cam"]["per_class"] if c != "background"]
    summary: dict[str, Any] = {"seeds": seeds, "classes": classes}
    for key in ("cam_baseline", "cam"):
        values = np.array([results[s][key]["miou"] for s in seeds])
        summary[key] = {
            "miou_mean": round(float(values.mean()), 2),
            "miou_std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 2),
            "miou_per_seed": [float(v) for v in values],
            "threshold_per_seed": [results[s][key]["threshold"] for s in seeds],
            "per_class_mean": {
                c: round(float(np.mean([results[s][key]["per_class"][c] for s in seeds])), 2)
                for c in ["background", *classes]
            },
        }
    collapsed: dict[str, list[int]] = {}
    for c in classes:
        for s in seeds:
            before, after = results[s]["cam_baseline"]["per_class"][c], results[s]["cam"]["per_class"][c]
            if after == 0 or after < COLLAPSE_SHARE * before:
                collapsed.setdefault(c, []).append(s)
    summary["collapsed"] = collapsed
    summary["gain"] = round(summary["cam"]["miou_mean"] - summary["cam_baseline"]["miou_mean"], 2)
    return summary


def format_tables(world: str, summary: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [
        f"world {world!r}: CAM mIoU (%) on val, {len(summary['seeds'])} seeds ({seeds})",
        "",
        "| network | mean ± std | per seed |",
        "| --- | ---: | --- |",
    ]
    for key, title in (("cam_baseline", "baseline CAM"), ("cam", "full CLIMS")):
        row = summary[key]
        per_seed = ", ".join(f"{v:.2f}" for v in row["miou_per_seed"])
        lines.append(f"| {title} | {row['miou_mean']:.2f} ± {row['miou_std']:.2f} | {per_seed} |")
    lines.append(f"| gain | {summary['gain']:+.2f} | |")
    names = ["background", *summary["classes"]]
    lines += ["", "| IoU (%), mean | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for key, title in (("cam_baseline", "baseline CAM"), ("cam", "full CLIMS")):
        values = summary[key]["per_class_mean"]
        lines.append(f"| {title} | " + " | ".join(f"{values[c]:.1f}" for c in names) + " |")
    collapsed = summary["collapsed"]
    lines.append("")
    lines.append(
        "collapsed classes (CLIMS IoU < "
        f"{COLLAPSE_SHARE:g} x baseline IoU, or 0), with seeds: "
        + (", ".join(f"{c} {v}" for c, v in collapsed.items()) if collapsed else "none")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/toyworld_transfer"))
    parser.add_argument("--worlds", default="first,second", help="toy_world.kind values, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", type=Path, help="write every seed's results and the summaries here")
    parser.add_argument(
        "--pipeline-arg",
        action="append",
        default=[],
        help="an extra argument for every pipeline call (repeatable), e.g. --pipeline-arg=--cpu-threads=1",
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: print the tables of the seeds whose results.json holds both networks",
    )
    parser.add_argument(
        "--clip",
        action="append",
        default=[],
        metavar="WORLD=DIR",
        help="use this finished train_clip output (a directory with model.pt and manifest.json) for WORLD "
        "instead of training its CLIP (repeatable)",
    )
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    worlds = [w.strip() for w in args.worlds.split(",") if w.strip()]
    clips = dict(item.split("=", 1) for item in args.clip)
    unknown = sorted(set(clips) - set(worlds))
    if unknown:
        raise SystemExit(f"--clip: worlds {unknown} are not in --worlds {worlds}")
    started, load_before = time.perf_counter(), os.getloadavg()
    out: dict[str, Any] = {"worlds": {}, "load_before": load_before}
    for world in worlds:
        clip_from = Path(clips[world]) if world in clips else None
        if args.summary_only:
            measured = {"results": finished_seeds(args.workdir / world, seeds), "seconds": {}}
            if not measured["results"]:
                print(f"[transfer] {world}: no finished seed yet")
                continue
        else:
            measured = run_world(args.workdir, world, seeds, args.pipeline_arg, clip_from)
        summary = summarise(measured["results"])
        out["worlds"][world] = {**measured, "summary": summary}
        print(format_tables(world, summary) + "\n", flush=True)
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["load_after"] = os.getloadavg()
    before, after = (", ".join(f"{v:.2f}" for v in load) for load in (load_before, out["load_after"]))
    print(
        f"[transfer] {out['wall_seconds']:.0f} s wall; load average (1, 5, 15 min) "
        f"before {before}, after {after}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
