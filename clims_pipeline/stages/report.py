"""Stage ``report``: ``<workdir>/results.md``, the pipeline's numbers beside the paper's, with their settings.

It reads ``results.json`` (whatever stages have run; a damaged or missing one is rebuilt from the stages' own
``<workdir>/<stage>/result_<key>.json`` files) and writes one table: CAM mIoU, +RW (PSA) and +IRNet
pseudo-mask mIoU and DeepLabV2 val mIoU beside the CLIMS camera-ready paper's 56.6 / 70.5 / 69.3 (VOC
2012; train, train, val) and the official repository's improved run (CAM 58.6, +IRNet 74.1 on train), each
with the split and the settings that produced it. It runs last with ``--stages all`` and is cheap to rerun.
"""

from __future__ import annotations

from typing import Any

from ..config import PRESET_CAVEATS
from ..context import Stage, StageContext, register_stage
from ..files import atomic_write, recover_results

#: CLIMS (CVPR 2022, camera-ready) on PASCAL VOC 2012: Table 1 (train split) and Table 2 (val, ImageNet init).
PAPER_RESULTS = {
    "cam": (56.6, "train (1,464 images)", "ResNet-50 CAM, CLIMS"),
    "rw": (70.5, "train (1,464 images)", "PSA random walk (beta 10, exp_times 8) + CRF"),
    "seg": (69.3, "val (1,449 images)", "DeepLabV2-ResNet-101, ImageNet init (COCO init: 70.4)"),
}
#: The official repository's improved run (README), VOC 2012 train: CAM at threshold 0.15, then IRNet.
OFFICIAL_RESULTS = {
    "cam": (58.6, "ResNet-50 CAM, CLIMS (weights 10/24/1/0.2)"),
    "irn": (74.1, "IRNet (thresholds 0.30/0.10, beta 10, exp_times 8, background 0.20)"),
}
ROWS = (
    ("cam", "CAM"),
    ("rw", "+RW pseudo masks (PSA)"),
    ("irn", "+IRNet pseudo masks"),
    ("seg", "DeepLabV2 val"),
)


def _settings(key: str, entry: dict[str, Any]) -> str:
    if key == "cam":
        return f"{entry.get('source', '?')}, best background threshold {entry.get('threshold')}, no CRF"
    if key == "irn":
        labels = entry.get("relation_labels") or {}
        return (
            f"beta {entry.get('beta')}, 2^{entry.get('exponent')} steps, background threshold "
            f"{entry.get('background_threshold')}, radius {entry.get('radius')}, relation labels "
            f"{labels.get('thresholds')} CRF {'on' if labels.get('crf') else 'off'}"
        )
    if key == "rw":
        return (
            f"beta {entry.get('beta')}, 2^{entry.get('exponent')} steps, background power "
            f"{entry.get('background_power')}, radius {entry.get('radius')}, "
            f"CRF {'on' if entry.get('crf') else 'off'}"
        )
    crf_part = f"CRF on ({entry.get('miou_no_crf')} without)" if entry.get("crf") else "CRF off"
    return (
        f"{entry.get('backbone')}, init {entry.get('init_weights')}, scales {entry.get('scales')}"
        f"{' + flip' if entry.get('flip') else ''}, {crf_part}, trained on {entry.get('mask_source')} masks"
    )


def render_results_markdown(results: dict[str, Any], header: str) -> str:
    lines = [
        "# CLIMS pipeline results",
        "",
        header,
        "",
        "| stage | mIoU (%) | split | settings | paper (%) | paper split and settings "
        "| official repository (%) |",
        "| --- | ---: | --- | --- | ---: | --- | --- |",
    ]
    for key, label in ROWS:
        paper = (
            f"{PAPER_RESULTS[key][0]} | {PAPER_RESULTS[key][1]}; {PAPER_RESULTS[key][2]}"
            if key in PAPER_RESULTS
            else "- | not in the paper"
        )
        official = (
            f"{OFFICIAL_RESULTS[key][0]} ({OFFICIAL_RESULTS[key][1]})" if key in OFFICIAL_RESULTS else "-"
        )
        references = f"{paper} | {official} |"
        entry = results.get(key)
        if entry is None:
            lines.append(f"| {label} | not run | | | {references}")
            continue
        if not _is_entry(entry):
            lines.append(
                f"| {label} | damaged entry {key!r} in results.json (rerun its stage) | | | {references}"
            )
            continue
        split = f"{entry.get('split')} ({entry.get('images')} images)"
        lines.append(f"| {label} | {entry['miou']:.2f} | {split} | {_settings(key, entry)} | {references}")
    baseline = results.get("cam_baseline")
    if baseline is not None and _is_entry(baseline):
        lines += [
            "",
            f"Baseline CAM (train_cam, before CLIMS): {baseline['miou']:.2f} on {baseline.get('split')}.",
        ]
    pictures = [
        f"- {results[key].get('source', key)}: `{results[key]['overlays']}`"
        for key in ("cam", "cam_baseline")
        if _is_entry(results.get(key)) and results[key].get("overlays")
    ]
    if pictures:
        lines += ["", "CAM overlays (image | CAM | prediction | ground truth), one PNG per image:", *pictures]
    return "\n".join(lines) + "\n"


def _is_entry(entry: Any) -> bool:
    """An evaluation stage's entry as it writes it: an object with a numeric ``miou``."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("miou"), (int, float))
        and not isinstance(entry.get("miou"), bool)
    )


@register_stage
class Report(Stage):
    name, order, help = "report", 90, "results.md: every stage's mIoU beside the paper's, with settings"

    def run(self, ctx: StageContext) -> None:
        write_report(ctx)


def write_report(ctx: StageContext) -> None:
    if not ctx.dist.is_main:
        return
    # A damaged results.json is moved aside (named in a warning) and, like a missing one, rebuilt from the
    # stages' own result files: it never costs a figure.
    results = recover_results(ctx.results_path)
    config = ctx.config
    header = (
        f"Dataset {config.dataset}, preset `{config.preset}`, variant `{config.variant}`, training split "
        f"`{config.data.train_split}`, {ctx.dist.world_size} process(es) on {ctx.device}. "
        + PRESET_CAVEATS.get(
            config.preset,
            f"The `{config.preset}` preset is not the paper's configuration: its numbers are not comparable "
            "with the paper's VOC figures beside them.",
        )
    )
    text = render_results_markdown(results, header)
    path = ctx.workdir / "results.md"
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))
    ctx.print(text)
    ctx.print(f"[report] wrote {path}")
