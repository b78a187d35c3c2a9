"""Full CLIMS on the first toy world with two deliberately bad CLIPs, for checking a CLIP readiness report.

Both start from a finished baseline CAM network (``train_cam`` of seed 0) and run ``train_clims`` with the
toy preset's settings, then ``make_cam`` and ``eval_cam`` on ``val`` (per-class CAM IoU in each run's
``results.json``, key ``cam``):

* ``captions_1ep``: a CLIP trained on the world's captions only (corpus ``captions``: no cut-outs, no
  object-free pictures, no dark copies), with captions that name only the objects (the world regenerated with
  ``background_caption_rate=0``: the same images, no background words) and for 1 epoch instead of 5.
* ``unseen_wording``: the recipe's CLIP (``--good-clip``) with class and background prompts worded as it was
  never trained ("a bad photo of the {}."; the toy captions say "a photo of boat.", "a photo of a boat.",
  "boat.", "a picture of ...", "an image with ..."; "bad" and "the" never occur in them).

It prints the per-class IoU of both beside the baseline's and the good CLIP's (``--good-run``), and the
zero-shot accuracy of each CLIP and wording (``clims_pipeline.toy.clip.zero_shot_report``).

    python benchmarks/toyworld_bad_clips.py --world runs/transfer/first/clip/toyworld \\
        --good-clip runs/transfer/first/clip/train_clip --good-run runs/transfer/first/seed0 \\
        --workdir runs/bad_clips
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The prompt wording the toy CLIP never saw (see the module docstring).
UNSEEN_TEMPLATE = "a bad photo of the {}."
UNSEEN_PRESET = "toy-unseen-wording"

# Runs the pipeline with a prompt preset that differs from the toy one only in its wording.
_WITH_UNSEEN_WORDING = f"""
import sys
import clims_loss as cl
import clims_pipeline.toy  # registers the toy world
from clims_pipeline.cli import main
def registry():
    toy = cl.BackgroundPromptRegistry.preset("toy")
    wording = {UNSEEN_TEMPLATE!r}
    return toy.replace(name={UNSEEN_PRESET!r}, template=wording, background_template=wording)
cl.BackgroundPromptRegistry.register({UNSEEN_PRESET!r}, registry)
raise SystemExit(main(sys.argv[1:]))
"""


def pipeline(argv: list[str], log: Path, code: str | None = None) -> None:
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "clims_pipeline", *argv]
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(argv)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"the pipeline failed ({done.returncode}): {' '.join(argv)}; see {log}")


def clims_run(
    run: Path,
    world: Path,
    clip_dir: Path,
    baseline: Path,
    extra: list[str],
    log: Path,
    code: str | None = None,
) -> dict[str, Any]:
    """train_clims from the baseline network with the CLIP of ``clip_dir``; make_cam and eval_cam on val."""
    run.mkdir(parents=True, exist_ok=True)
    for stage, source in (("train_cam", baseline / "train_cam"), ("train_clip", clip_dir)):
        if not (run / stage).exists():
            shutil.copytree(source, run / stage)
    common = ["--workdir", str(run), "--dataset", "toy", "--data-root", str(world), "--seed", "0", *extra]
    pipeline([*common, "--stages", "train_clims"], log, code)
    pipeline(
        [*common, "--stages", "make_cam,eval_cam", "--cam-source", "train_clims", "--train-split", "val"],
        log,
        code,
    )
    results: dict[str, Any] = json.loads((run / "results.json").read_text())
    return results


def _results(run: Path) -> dict[str, Any]:
    path = run / "results.json"
    found: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=Path, required=True, help="the first toy world")
    parser.add_argument("--good-clip", type=Path, required=True, help="its recipe CLIP (a train_clip output)")
    parser.add_argument(
        "--good-run",
        type=Path,
        required=True,
        help="a seed-0 run with train_cam and results.json (cam_baseline, cam)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/toyworld_bad_clips"))
    parser.add_argument(
        "--pipeline-arg", action="append", default=[], help="extra pipeline argument (repeatable)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from clims_pipeline.toy.clip import TOY_CLIP_CONFIG, zero_shot_report
    from clims_pipeline.toy.world import generate_toy_world, load_toy_world

    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "pipeline.log"
    config = load_toy_world(args.world)["config"]
    objects_only = args.workdir / "objects_only_world"
    generate_toy_world(
        objects_only,
        n_train=config["n_train"],
        n_val=config["n_val"],
        seed=config["seed"],
        kind=config.get("kind", "first"),
        background_caption_rate=0.0,
        progress=False,
    )
    clip_run = args.workdir / "captions_1ep" / "clip"
    pipeline(
        [
            "--workdir",
            str(clip_run),
            "--dataset",
            "toy",
            "--data-root",
            str(objects_only),
            "--stages",
            "train_clip",
            "--set",
            "train_clip.corpus=captions",
            "--set",
            "train_clip.epochs=1",
            "--set",
            'train_clip.caption_splits=["train_aug"]',
            *args.pipeline_arg,
        ],
        log,
    )
    while "cam" not in _results(args.good_run):  # the baseline network of seed 0 is still training
        time.sleep(30)
    results = {
        "captions_1ep": clims_run(
            args.workdir / "captions_1ep" / "seed0",
            args.world,
            clip_run / "train_clip",
            args.good_run,
            args.pipeline_arg,
            log,
        ),
        "unseen_wording": clims_run(
            args.workdir / "unseen_wording" / "seed0",
            args.world,
            args.good_clip,
            args.good_run,
            [*args.pipeline_arg, "--set", f"train_clims.prompts={UNSEEN_PRESET}"],
            log,
            _WITH_UNSEEN_WORDING,
        ),
    }
    good = _results(args.good_run)
    rows = {
        "baseline CAM (seed 0)": good["cam_baseline"],
        "full CLIMS, recipe CLIP": good["cam"],
        "full CLIMS, captions-only 1-epoch CLIP": results["captions_1ep"]["cam"],
        f"full CLIMS, recipe CLIP, prompts {UNSEEN_TEMPLATE!r}": results["unseen_wording"]["cam"],
    }
    names = list(good["cam"]["per_class"])
    lines = [
        "| CAM IoU (%), val, seed 0 | mIoU | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * (len(names) + 1),
    ]
    for title, result in rows.items():
        lines.append(
            f"| {title} | {result['miou']:.2f} | "
            + " | ".join(f"{result['per_class'][c]:.1f}" for c in names)
            + " |"
        )
    zero_shot = {
        "recipe CLIP, 'a photo of {}.'": zero_shot_report(
            args.world, model_name=TOY_CLIP_CONFIG, pretrained=args.good_clip / "model.pt"
        ),
        f"recipe CLIP, {UNSEEN_TEMPLATE!r}": zero_shot_report(
            args.world,
            model_name=TOY_CLIP_CONFIG,
            pretrained=args.good_clip / "model.pt",
            template=UNSEEN_TEMPLATE,
        ),
        "captions-only 1-epoch CLIP, 'a photo of {}.'": zero_shot_report(
            args.world, model_name=TOY_CLIP_CONFIG, pretrained=clip_run / "train_clip" / "model.pt"
        ),
    }
    lines += [
        "",
        "| CLIP, prompt | zero-shot top-1 (single-class val images) | background zero-shot accuracy |",
    ]
    lines.append("| --- | ---: | ---: |")
    for title, report in zero_shot.items():
        lines.append(
            f"| {title} | {report['top1_accuracy_single_class']:.3f} | "
            f"{report.get('background_zero_shot_accuracy', float('nan')):.3f} |"
        )
    print("\n".join(lines))
    out = {
        "results": results,
        "zero_shot": zero_shot,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
