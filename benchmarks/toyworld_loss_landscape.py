"""Does the CLIMS loss prefer the true masks? The loss of a toy-world CLIP at the ground truth and at
maps that are wrong in known ways.

Run this before an ablation: if the whole image (``ones``) or the object plus its surroundings
(``dil8``) costs less than the true masks (``ground_truth``), no weighting of the four terms can teach a
CAM network the objects with that CLIP. Columns: mean cosine similarity of the foreground view to the
class prompt (``s_fg``), of the background view (``s_bg``), of the foreground view to the class's
background prompts (``s_fg_bg``), the unweighted terms and the weighted total. See docs/toyworld.md.

    python benchmarks/toyworld_loss_landscape.py --world runs/toyworld/toyworld \\
        --clip runs/toyworld/train_clip/model.pt
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import clims_loss as cl
from clims_pipeline.toy import experiment as experiment
from clims_pipeline.toy.clip import TOY_CLIP_CONFIG
from clims_pipeline.toy.world import TOY_CLASSES


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(masks, 2 * radius + 1, stride=1, padding=radius)


def _left_half(masks: torch.Tensor) -> torch.Tensor:
    xs = torch.arange(masks.shape[-1], dtype=masks.dtype).view(1, 1, 1, -1)
    centre = (masks * xs).sum((2, 3), keepdim=True) / masks.sum((2, 3), keepdim=True).clamp_min(1)
    return masks * (xs < centre)


def _coarse(masks: torch.Tensor, stride: int = 4) -> torch.Tensor:
    return F.interpolate(
        F.avg_pool2d(masks, stride), size=masks.shape[-2:], mode="bilinear", align_corners=False
    )


#: name -> maps made from the (N, K, H, W) ground-truth masks
MAP_FAMILIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ground_truth": lambda m: m,
    "dil3": lambda m: _dilate(m, 3),
    "dil8": lambda m: _dilate(m, 8),
    "half": _left_half,
    "coarse4": _coarse,
    "ones": torch.ones_like,
}


@torch.no_grad()
def loss_landscape(
    evaluator: cl.CLIPTextDrivenEvaluator, data: experiment.SplitTensors, batch_size: int = 100
) -> dict[str, dict[str, float]]:
    """For every map family: mean similarities, unweighted terms and the weighted loss over ``data``."""
    truth = torch.stack([(data.masks == k + 1).float() for k in range(len(TOY_CLASSES))], dim=1)
    weights = evaluator.weights
    report = {}
    for name, make in MAP_FAMILIES.items():
        maps = make(truth).clamp(0, 1)
        sums: dict[str, float] = {}
        pairs = batches = 0
        for start in range(0, len(data.ids), batch_size):
            rows = slice(start, start + batch_size)
            out = evaluator(data.images[rows], maps[rows], data.labels[rows])
            count = out.sim_fg_text.numel()
            for key, value in (
                ("s_fg", out.sim_fg_text.sum()),
                ("s_bg", out.sim_bg_text.sum()),
                ("s_fg_bg", out.sim_fg_bgtext.mean(dim=1).sum()),
            ):
                sums[key] = sums.get(key, 0.0) + float(value)
            for key in ("otm", "btm", "cbs", "reg", "loss"):
                sums[key] = sums.get(key, 0.0) + float(getattr(out, key))
            pairs, batches = pairs + count, batches + 1
        report[name] = {
            **{key: sums[key] / pairs for key in ("s_fg", "s_bg", "s_fg_bg")},
            **{key: sums[key] / batches for key in ("otm", "btm", "cbs", "reg", "loss")},
        }
    report["weights"] = {"otm": weights.otm, "btm": weights.btm, "cbs": weights.cbs, "reg": weights.reg}
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "| maps | s_fg | s_bg | s_fg_bg | otm | btm | cbs | reg | weighted loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in MAP_FAMILIES:
        r = report[name]
        lines.append(
            f"| {name} | {r['s_fg']:.3f} | {r['s_bg']:.3f} | {r['s_fg_bg']:.3f} | {r['otm']:.3f} | "
            f"{r['btm']:.3f} | {r['cbs']:.3f} | {r['reg']:.3f} | {r['loss']:.2f} |"
        )
    best = min(MAP_FAMILIES, key=lambda name: report[name]["loss"])
    verdict = (
        "the true masks are the cheapest" if best == "ground_truth" else f"`{best}` is cheaper than the truth"
    )
    return "\n".join(lines) + f"\n\nlowest loss: {best} ({verdict})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=Path, required=True, help="a toy world (VOC layout)")
    parser.add_argument("--clip", type=Path, required=True, help="a tiny-CLIP checkpoint of stage train_clip")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=400, help="first N images of the split")
    parser.add_argument("--weights", default="10,25,29.5,1.15", help="otm,btm,cbs,reg")
    parser.add_argument("--similarity", choices=("clamp", "affine"), default="clamp")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    values = [float(v) for v in args.weights.split(",")]
    if len(values) != 4:
        raise SystemExit(
            f"--weights: expected 4 comma-separated numbers (otm,btm,cbs,reg), got {args.weights!r}"
        )
    weights = dict(zip(("otm", "btm", "cbs", "reg"), values, strict=True))
    data = experiment.load_split(args.world, args.split, len(TOY_CLASSES), args.images)
    evaluator = experiment.build_toy_evaluator(TOY_CLIP_CONFIG, args.clip, weights, args.similarity)
    report = loss_landscape(evaluator, data)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
