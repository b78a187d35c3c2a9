"""One CLIMS evaluator training step: the fused path vs the reference per-pair loop vs the encoder floor.

Every variant times one step, forward + backward to the CAM maps, on identical inputs (same seed,
same random-init CLIP weights), each in its own process so that its peak memory is its own:

* ``fused``: ``CLIPTextDrivenEvaluator(model, tokenizer)`` with its defaults (preset ``"voc"``,
  pixel-space masking, input validation on);
* ``reference``: the official improved training step re-implemented here from its facts (Python
  loop over the positive pairs, prompts tokenised and encoded every step, the image encoder run on
  fg, bg and fg again, CLIP's parameters left requiring gradients; class names, background prompts,
  weights, clamp bounds and hinge as written out below);
* ``floor``: one ``encode_image`` forward + backward to the input over the same ``2N`` views,
  which is the least any implementation of the method can do.

Further rows change only how the encoder pass is executed (channels_last, the SDPA kernel,
``torch.compile``, bf16 autocast) and report their error against the fp32 fused step; the scaling
rows run the fused step at several pair counts with and without ``max_views_per_forward``.

``--check-cost`` adds what the input and setting checks cost per step, side by side with the step:
the value checks (NaN, ranges, labels; read at the sync the pair search pays anyway), the setting
checks of the loss functions, and the first-call-only image range read (``--check-cost-only``
measures just that).

Run ``python benchmarks/bench_evaluator.py --json out.json``; ``--help`` lists the options. The
table is printed; ``--json`` also writes the figures. This is a measurement, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import clims_loss as cl
from clims_loss.clip_loading import clip_input_size

REPO_ROOT = Path(__file__).resolve().parents[1]

NUM_CLASSES = 20
RESULT_MARKER = "BENCH_RESULT "

# Facts of the official improved code's training step (VOC), written out here so that the reference
# does not borrow anything from the library it is compared with: one prompt "a photo of {name}." per
# pair with "person" written "player", ten global background prompts, weights 10/24/1/0.2 for
# OTM/BTM/CBS/REG, similarities clamped to [1e-4, 0.9999] in OTM and BTM, and a CBS hinge at 0.26.
OFFICIAL_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "player", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)  # fmt: skip
OFFICIAL_BACKGROUNDS = (
    "tree",
    "river",
    "sea",
    "lake",
    "water",
    "railway",
    "railroad",
    "track",
    "stone",
    "rocks",
)
OFFICIAL_TEMPLATE = "a photo of {}."
OFFICIAL_WEIGHTS = (10.0, 24.0, 1.0, 0.2)  # OTM, BTM, CBS, REG
OFFICIAL_CBS_THRESHOLD = 0.26
OFFICIAL_SIM_BOUNDS = (1e-4, 0.9999)


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "ViT-B-32"
    model_config: str | None = None  # open_clip CLIP(**config) as JSON text or a path; overrides model
    batch: int = 8
    pairs: int = 16
    image_size: int = 512
    cam_size: int = 32  # a stride-16 CAM net on a 512 crop, as in the official pipeline
    steps: int = 5
    warmup: int = 1
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    device: str = "cpu"
    threads: int = 2
    seed: int = 0
    max_views_per_forward: int | None = None

    def replace(self, **changes: Any) -> BenchConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: what runs (``kind``), on which config, with which encoder tricks."""

    name: str
    kind: str  # "fused" | "reference" | "floor"
    description: str
    preset: str = "voc"
    validate: bool = True
    channels_last: bool = False
    sdpa_math: bool = False
    compile: bool = False
    bf16: bool = False
    pairs: int | None = None
    max_views_per_forward: int | None = None
    error_vs_fp32: bool = False
    steps: int | None = None


# ---------------------------------------------------------------------------------------------- model, inputs
def load_model_config(text_or_path: str) -> dict[str, Any]:
    text = text_or_path if text_or_path.lstrip().startswith("{") else Path(text_or_path).read_text()
    config: dict[str, Any] = json.loads(text)
    return config


def build_clip(config: BenchConfig) -> tuple[nn.Module, Callable[[list[str]], Tensor]]:
    """The same random-init CLIP in every process: the seed fixes the weights."""
    import open_clip

    torch.manual_seed(config.seed)
    if config.model_config is not None:
        clip_config = load_model_config(config.model_config)
        model = open_clip.CLIP(**clip_config)
        context_length = clip_config.get("text_cfg", {}).get("context_length", 77)
        tokenizer: Callable[[list[str]], Tensor] = open_clip.tokenizer.SimpleTokenizer(
            context_length=context_length
        )
    else:
        model = open_clip.create_model(config.model, pretrained=None)
        tokenizer = open_clip.get_tokenizer(config.model)
    return model.eval().to(config.device), tokenizer


def make_labels(batch: int, pairs: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """``pairs`` positive (image, class) pairs spread round-robin over the images, random classes."""
    if not 0 < pairs <= batch * num_classes:
        raise ValueError(f"expected 0 < pairs <= batch * classes = {batch * num_classes}, got {pairs}")
    labels = torch.zeros(batch, num_classes)
    orders = [torch.randperm(num_classes, generator=generator) for _ in range(batch)]
    for pair in range(pairs):
        image = pair % batch
        labels[image, orders[image][pair // batch]] = 1.0
    return labels


def make_inputs(config: BenchConfig, pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    """ImageNet-normalised images, maps in [0, 1] (the leaf we differentiate to), multi-hot labels."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    pixels = torch.rand(config.batch, 3, config.image_size, config.image_size, generator=generator)
    mean = torch.tensor(cl.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cl.IMAGENET_STD).view(1, 3, 1, 1)
    images = (pixels - mean) / std
    # Smooth maps (upsampled noise) look more like CAMs than white noise; the cost does not care.
    coarse = torch.randn(config.batch, NUM_CLASSES, 4, 4, generator=generator)
    cams = torch.sigmoid(2.0 * F.interpolate(coarse, size=(config.cam_size,) * 2, mode="bilinear"))
    labels = make_labels(config.batch, pairs, NUM_CLASSES, generator)
    device = torch.device(config.device)
    return images.to(device), cams.to(device).requires_grad_(True), labels.to(device)


# ---------------------------------------------------------------------------------------------- reference
def _normalise_rows(features: Tensor) -> Tensor:
    return features / features.norm(dim=-1, keepdim=True)


class ReferenceCLIMSStep:
    """The official improved CLIMS step, from the facts listed at the top of this file (the baseline to beat).

    Deliberately as slow as the original: a Python loop over pairs builds the views, the prompts
    are tokenised and encoded on every call, the image encoder runs on fg (OTM), bg (BTM) and fg
    again (CBS), and CLIP's parameters keep ``requires_grad=True`` (only ``.eval()``).
    """

    def __init__(
        self, clip_model: nn.Module, tokenizer: Callable[[list[str]], Tensor], input_size: int
    ) -> None:
        self.clip_model = clip_model.eval()
        self.clip_model.requires_grad_(True)
        self.tokenizer = tokenizer
        self.input_size = input_size

    def _device(self) -> torch.device:
        return next(self.clip_model.parameters()).device

    def _pair_similarity(self, views: Tensor, class_indices: list[int]) -> Tensor:
        # Prompts are rebuilt and re-encoded for every call, one per pair, as the official code does.
        texts = [OFFICIAL_TEMPLATE.format(OFFICIAL_CLASS_NAMES[k]) for k in class_indices]
        tokens = self.tokenizer(texts).to(self._device())
        image_features = _normalise_rows(self.clip_model.encode_image(views))
        text_features = _normalise_rows(self.clip_model.encode_text(tokens))
        return (image_features.unsqueeze(1) @ text_features.unsqueeze(2)).reshape(-1)

    def __call__(self, images: Tensor, cams: Tensor, labels: Tensor) -> dict[str, Tensor]:
        batch, classes = cams.shape[:2]
        size = (self.input_size, self.input_size)
        # Every map of every image is resized, positive or not, then the pairs are picked one by one.
        maps = F.interpolate(cams, size, mode="bilinear", align_corners=True).reshape(
            batch * classes, 1, *size
        )
        resized_images = F.interpolate(images, size, mode="bilinear", align_corners=True)
        flat_positive = torch.nonzero(labels.reshape(-1) == 1).reshape(-1)
        pair_rows = torch.nonzero(labels == 1)
        foreground, background = [], []
        for j in range(pair_rows.shape[0]):
            pair_map = maps[flat_positive[j]]
            image = resized_images[pair_rows[j, 0]]
            foreground.append(pair_map * image)
            background.append((1 - pair_map) * image)
        fg_views = torch.stack(foreground)
        bg_views = torch.stack(background)
        class_indices = [int(k) for k in pair_rows[:, 1]]

        low, high = OFFICIAL_SIM_BOUNDS
        otm = -torch.log(self._pair_similarity(fg_views, class_indices).clamp(low, high)).mean()
        btm = -torch.log(1 - self._pair_similarity(bg_views, class_indices).clamp(low, high)).mean()

        background_tokens = self.tokenizer([OFFICIAL_TEMPLATE.format(t) for t in OFFICIAL_BACKGROUNDS])
        fg_features = _normalise_rows(self.clip_model.encode_image(fg_views))
        background_features = _normalise_rows(
            self.clip_model.encode_text(background_tokens.to(self._device()))
        )
        similarity = fg_features @ background_features.T
        above_threshold = (similarity > OFFICIAL_CBS_THRESHOLD).to(similarity.dtype)
        cbs = -(torch.log(1 - similarity) * above_threshold).sum()

        reg = cams.mean()
        w_otm, w_btm, w_cbs, w_reg = OFFICIAL_WEIGHTS
        loss = w_otm * otm + w_btm * btm + w_cbs * cbs + w_reg * reg
        return {"loss": loss, "otm": otm, "btm": btm, "cbs": cbs, "reg": reg}


# ---------------------------------------------------------------------------------------------- helpers
class CallCounter:
    """Counts the calls of a bound method by shadowing it with an instance attribute."""

    def __init__(self, owner: object, method: str) -> None:
        self.calls = 0
        original = getattr(owner, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        setattr(owner, method, counted)


class SimilarityShiftedCLIP(nn.Module):
    """A random-init CLIP whose similarities spread over (0, 1), for a parity check with teeth.

    Random weights give cosine similarities near 0, where every OTM term is clamped (no gradient)
    and no CBS term passes the 0.26 hinge, so two implementations would agree trivially. Adding a
    shared direction to every embedding (a text-dependent amount for texts) moves the similarities
    into the range where the clamps, the hinge and the logs all matter. Both implementations call
    the same ``encode_image``/``encode_text``, so this changes nothing about what is compared.
    """

    def __init__(self, clip_model: nn.Module, embed_dim: int, seed: int) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.visual = clip_model.visual
        generator = torch.Generator().manual_seed(seed)
        direction = torch.randn(embed_dim, generator=generator)
        device = next(clip_model.parameters()).device
        self.register_buffer("direction", (direction / direction.norm()).to(device))

    def encode_image(self, images: Tensor) -> Tensor:
        return _normalise_rows(self.clip_model.encode_image(images)) + self.direction

    def encode_text(self, tokens: Tensor) -> Tensor:
        # An amount in [0.2, 1.8) fixed by the tokens: similarities from ~0.15 to ~0.85.
        amount = 0.2 + 1.6 * torch.frac(tokens.double().sum(dim=1) * 0.6180339887).to(self.direction.dtype)
        return _normalise_rows(self.clip_model.encode_text(tokens)) + amount.unsqueeze(1) * self.direction


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux >= 4.0), so that the peak is the step's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    peak_kb = _proc_status_kb("VmHWM")
    if peak_kb is None:  # not Linux: the lifetime peak (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return peak_kb / 1024


def _rss_mb() -> float:
    rss_kb = _proc_status_kb("VmRSS")
    return float("nan") if rss_kb is None else rss_kb / 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _encoder_context(variant: Variant, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    stack = contextlib.ExitStack()
    if variant.bf16:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if variant.sdpa_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def _patch_channels_last(evaluator: cl.CLIPTextDrivenEvaluator) -> None:
    """Proposed library change, measured here by shadowing ``encode_views`` on the instance."""
    plain_encode_views = evaluator.encode_views

    def encode_views_channels_last(views: Tensor) -> Tensor:
        return plain_encode_views(views.contiguous(memory_format=torch.channels_last))

    evaluator.encode_views = encode_views_channels_last  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------- one step
StepFn = Callable[[], Tensor]


def _build_step(
    variant: Variant, config: BenchConfig, model: nn.Module, tokenizer: Callable[[list[str]], Tensor]
) -> tuple[StepFn, Tensor, Callable[[], float]]:
    """The step of ``variant``: a closure returning the loss, the leaf it differentiates to, and a reader
    of the per-step text-encoder call count."""
    pairs = variant.pairs or config.pairs
    images, cams, labels = make_inputs(config, pairs)
    device = torch.device(config.device)
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    if variant.compile:
        model.visual = torch.compile(model.visual)

    if variant.kind == "floor":
        num_views = 2 * int(labels.sum())
        size = clip_input_size(model)
        generator = torch.Generator().manual_seed(config.seed + 2)
        views = torch.randn(num_views, 3, size, size, generator=generator).to(device).requires_grad_(True)
        model.requires_grad_(False)

        def floor_step() -> Tensor:
            return model.encode_image(views).float().sum()

        return floor_step, views, lambda: 0.0

    if variant.kind == "reference":
        reference = ReferenceCLIMSStep(model, tokenizer, clip_input_size(model))
        counter = CallCounter(model, "encode_text")

        def reference_step() -> Tensor:
            return reference(images, cams, labels)["loss"]

        return reference_step, cams, lambda: float(counter.calls)

    kwargs: dict[str, Any] = {"validate": variant.validate}
    if variant.preset == "voc-official":
        kwargs.update(image_mean=cl.IMAGENET_MEAN, image_std=cl.IMAGENET_STD)
    cap = variant.max_views_per_forward or config.max_views_per_forward
    evaluator = cl.CLIPTextDrivenEvaluator(
        model, tokenizer, variant.preset, max_views_per_forward=cap, **kwargs
    )
    evaluator = evaluator.to(device)
    if variant.channels_last:
        _patch_channels_last(evaluator)
    counter = CallCounter(model, "encode_text")  # after construction: the cached prompts are not per step

    def fused_step() -> Tensor:
        return evaluator(images, cams, labels).loss

    return fused_step, cams, lambda: float(counter.calls)


def _timed_step(
    step: StepFn, leaf: Tensor, variant: Variant, config: BenchConfig
) -> tuple[float, float, Tensor, Tensor]:
    """One forward + backward to ``leaf``: (wall seconds, process CPU seconds, loss, gradient)."""
    device = torch.device(config.device)
    as_bf16 = dataclasses.replace(variant, bf16=variant.bf16 or config.dtype == "bf16")
    leaf.grad = None
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with _encoder_context(as_bf16, device):
        loss = step()
    loss.backward()
    _synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert leaf.grad is not None
    return wall, cpu, loss.detach(), leaf.grad


def run_timing(variants: Sequence[Variant], config: BenchConfig) -> dict[str, Any]:
    """Time ``variants`` round-robin in this process, one step each per round.

    The machine is shared: a load change between two sequential runs would move their ratio, so
    every round holds one step of each variant and the ratios are medians of per-round ratios.
    Each variant has its own copy of the same CLIP (the reference switches gradients on).
    """
    torch.set_num_threads(config.threads)
    built = []
    for variant in variants:
        model, tokenizer = build_clip(config)
        built.append((variant, *_build_step(variant, config, model, tokenizer)))
    for _ in range(config.warmup):
        for variant, step, leaf, _ in built:
            _timed_step(step, leaf, variant, config)
    calls_before = [text_calls() for *_, text_calls in built]
    walls: dict[str, list[float]] = {v.name: [] for v in variants}
    cpus: dict[str, list[float]] = {v.name: [] for v in variants}
    last: dict[str, tuple[Tensor, Tensor]] = {}
    for _ in range(config.steps):
        for variant, step, leaf, _ in built:
            wall, cpu, loss, grad = _timed_step(step, leaf, variant, config)
            walls[variant.name].append(wall)
            cpus[variant.name].append(cpu)
            last[variant.name] = (loss, grad)
    baseline = variants[0].name
    rows: dict[str, Any] = {}
    for (variant, *_, text_calls), before in zip(built, calls_before, strict=True):
        times = walls[variant.name]
        row: dict[str, Any] = {
            "name": variant.name,
            "description": variant.description,
            "pairs": variant.pairs or config.pairs,
            "step_s": statistics.median(times),
            "step_s_min": min(times),
            "step_s_max": max(times),
            "step_s_all": times,
            "cpu_s": statistics.median(cpus[variant.name]),
            "text_encoder_calls_per_step": (text_calls() - before) / max(config.steps, 1),
            "loss": float(last[variant.name][0]),
            f"over_{baseline}_paired": statistics.median(
                t / b for t, b in zip(times, walls[baseline], strict=True)
            ),
        }
        if variant.error_vs_fp32:
            (loss, grad), (base_loss, base_grad) = last[variant.name], last[baseline]
            row["loss_rel_err_vs_fp32"] = float(
                (loss.double() - base_loss.double()).abs() / base_loss.double().abs()
            )
            row["grad_rel_err_vs_fp32"] = float(
                (grad.double() - base_grad.double()).abs().max()
                / base_grad.double().abs().max().clamp_min(1e-30)
            )
        rows[variant.name] = row
    return {"rows": rows, "paired": {name: walls[name] for name in walls}}


def run_memory(variant: Variant, config: BenchConfig) -> dict[str, Any]:
    """Peak memory of ``variant`` over a warm-up and one step, alone in this (fresh) process."""
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    model, tokenizer = build_clip(config)
    step, leaf, _ = _build_step(variant, config, model, tokenizer)
    gc.collect()
    resident_before_mb = _rss_mb() if device.type == "cpu" else 0.0
    peak_reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Two steps: from the second on, the reference also holds CLIP's accumulated .grad buffers.
    walls = [_timed_step(step, leaf, variant, config)[0] for _ in range(max(config.warmup, 1) + 1)]
    if device.type == "cuda":
        peak_mem_mb, memory_kind = (
            torch.cuda.max_memory_allocated(device) / 2**20,
            "cuda max_memory_allocated",
        )
    else:
        peak_mem_mb = _peak_rss_mb()
        memory_kind = "peak RSS during the steps" if peak_reset else "peak RSS of the process"
    return {
        "peak_mem_mb": peak_mem_mb,
        "step_mem_mb": peak_mem_mb - resident_before_mb,
        "resident_before_mb": resident_before_mb,
        "memory_kind": memory_kind,
        "isolated_step_s": walls[-1],
    }


# ---------------------------------------------------------------------------------------------- parity
def run_parity(config: BenchConfig) -> dict[str, Any]:
    """``voc-official`` evaluator vs the reference step, fp32, identical inputs; raw and shifted CLIP."""
    torch.set_num_threads(config.threads)
    model, tokenizer = build_clip(config)
    embed_dim = int(model.encode_image(torch.zeros(1, 3, *(clip_input_size(model),) * 2)).shape[-1])
    images, cams, labels = make_inputs(config, config.pairs)
    cases = {
        "random_init": model,
        "similarity_shifted": SimilarityShiftedCLIP(model, embed_dim, config.seed + 3),
    }
    report: dict[str, Any] = {}
    worst = 0.0
    for case, clip_model in cases.items():
        evaluator = cl.CLIPTextDrivenEvaluator(
            clip_model, tokenizer, "voc-official", image_mean=cl.IMAGENET_MEAN, image_std=cl.IMAGENET_STD
        )
        cams.grad = None
        fused = evaluator(images, cams, labels)
        fused.loss.backward()
        fused_grad = cams.grad.detach().clone()
        fused_parts = {
            "loss": fused.loss,
            "otm": fused.otm,
            "btm": fused.btm,
            "cbs": fused.cbs,
            "reg": fused.reg,
        }

        reference = ReferenceCLIMSStep(clip_model, tokenizer, evaluator.input_size)
        cams.grad = None
        reference_parts = reference(images, cams, labels)
        reference_parts["loss"].backward()
        reference_grad = cams.grad.detach().clone()
        clip_model.requires_grad_(False)

        parts = {}
        for key, value in reference_parts.items():
            ours, theirs = float(fused_parts[key].detach()), float(value.detach())
            parts[key] = {
                "fused": ours,
                "reference": theirs,
                "rel_err": abs(ours - theirs) / max(abs(theirs), 1e-30),
            }
        grad_err = float(
            (fused_grad - reference_grad).abs().max() / reference_grad.abs().max().clamp_min(1e-30)
        )
        sims = fused.sim_fg_text.detach()
        report[case] = {
            "parts": parts,
            "grad_rel_err": grad_err,
            "sim_fg_text_range": [float(sims.min()), float(sims.max())],
            "cbs_terms_counted": int((fused.sim_fg_bgtext > OFFICIAL_CBS_THRESHOLD).sum()),
        }
        worst = max(worst, parts["loss"]["rel_err"])
    report["loss_parity_max_rel_err"] = worst
    return report


# ---------------------------------------------------------------------------------------------- check cost
def _median_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_check_cost(config: BenchConfig, repeats: int = 50) -> dict[str, Any]:
    """What the checks add to one fused step, each part timed alone on the step's own inputs.

    * value checks: ``check_evaluator_inputs(validate=True)`` and reading its flags, minus the same
      with ``validate=False`` (the pair search's sync, which every step pays anyway);
    * setting checks: the four loss functions on the step's similarities with ``validate=False``.
      This times the losses' arithmetic too, so it is an upper bound of their checks;
    * first call only: the image range read behind the un-normalised-images warning.
    """
    import warnings

    from clims_loss.masking import check_evaluator_inputs, positive_pairs

    torch.set_num_threads(config.threads)
    model, tokenizer = build_clip(config)
    images, cams, labels = make_inputs(config, config.pairs)
    evaluator = cl.CLIPTextDrivenEvaluator(model, tokenizer, "voc").to(torch.device(config.device))
    device = torch.device(config.device)

    def step() -> None:
        cams.grad = None
        evaluator(images, cams, labels).loss.backward()
        _synchronize(device)

    for _ in range(max(config.warmup, 1)):
        step()
    step_s = _median_time(step, max(config.steps, 1))

    def with_checks() -> None:
        pending = check_evaluator_inputs(images, cams, labels, validate=True)
        positive_pairs(labels)
        pending.raise_if_failed()

    def without_checks() -> None:
        pending = check_evaluator_inputs(images, cams, labels, validate=False)
        batch_index, _ = positive_pairs(labels)
        int(batch_index.shape[0])  # the sync every step pays
        pending.raise_if_failed()

    out = evaluator(images, cams, labels)
    sims = (out.sim_fg_text.detach(), out.sim_bg_text.detach(), out.sim_fg_bgtext.detach())
    mask = evaluator.background_mask[out.class_index]

    def loss_functions() -> None:
        cl.otm_loss(sims[0], validate=False)
        cl.btm_loss(sims[1], validate=False)
        cl.cbs_loss(sims[2], mask, prompt_reduction="mean", validate=False)
        cl.reg_loss(cams.detach(), validate=False)

    def first_call_range_read() -> None:
        evaluator._images_checked = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator._check_image_range(images)

    with torch.no_grad():
        value_checks_s = max(_median_time(with_checks, repeats) - _median_time(without_checks, repeats), 0.0)
        loss_functions_s = _median_time(loss_functions, repeats)
        first_call_s = _median_time(first_call_range_read, repeats)
    per_step_s = value_checks_s + loss_functions_s
    return {
        "step_s": step_s,
        "value_checks_s": value_checks_s,
        "loss_functions_with_setting_checks_s": loss_functions_s,
        "first_call_range_read_s": first_call_s,
        "later_step_check_fraction": per_step_s / step_s,
        "first_step_check_fraction": (per_step_s + first_call_s) / step_s,
        "repeats": repeats,
    }


def _format_check_cost(cost: dict[str, Any], paired: float | None) -> str:
    paired_text = (
        "" if paired is None else f"; main table, paired per round: fused / fused-novalidate = {paired:.3f}"
    )
    return (
        f"check cost per step (medians of {cost['repeats']} repeats, step median of the timed steps):\n"
        f"  value checks (NaN, [0, 1], labels; flags read at the pair search's sync) "
        f"{1e3 * cost['value_checks_s']:.2f} ms\n"
        f"  loss functions incl. their setting checks (upper bound)            "
        f"{1e3 * cost['loss_functions_with_setting_checks_s']:.2f} ms\n"
        f"  first call only: image range read (un-normalised warning)          "
        f"{1e3 * cost['first_call_range_read_s']:.2f} ms\n"
        f"  step (forward + backward)                                          {cost['step_s']:.3f} s\n"
        f"  => later steps: {100 * cost['later_step_check_fraction']:.3f} % of a step, first step: "
        f"{100 * cost['first_step_check_fraction']:.3f} % (target <= 1 %){paired_text}"
    )


# ---------------------------------------------------------------------------------------------- orchestration
def main_variants() -> list[Variant]:
    return [
        Variant("fused", "fused", "CLIPTextDrivenEvaluator defaults (voc, pixel masking, validate=True)"),
        Variant("fused-novalidate", "fused", "as fused, validate=False", validate=False),
        Variant("reference", "reference", "official improved step: per-pair loop, 3 encoder passes"),
        Variant("floor", "floor", "encode_image fwd + bwd to the input over the 2N views"),
    ]


#: The rows ``--under-floor`` can add, by the name ``--under-floor-rows`` uses.
UNDER_FLOOR_ROWS: dict[str, Variant] = {
    "channels_last": Variant(
        "+channels_last", "fused", "views and conv1 in channels_last", channels_last=True, error_vs_fp32=True
    ),
    "sdpa-math": Variant(
        "+sdpa-math",
        "fused",
        "SDPA forced to its math kernel (open_clip uses SDPA already)",
        sdpa_math=True,
        error_vs_fp32=True,
    ),
    "bf16": Variant(
        "+bf16-autocast", "fused", "torch.autocast(bfloat16), opt-in", bf16=True, error_vs_fp32=True
    ),
    "compile": Variant(
        "+compile", "fused", "torch.compile(model.visual), inductor", compile=True, error_vs_fp32=True
    ),
}


def under_floor_variants(names: Sequence[str]) -> list[Variant]:
    """The fp32 fused baseline of the group, then the named rows of ``UNDER_FLOOR_ROWS``."""
    unknown = [name for name in names if name not in UNDER_FLOOR_ROWS]
    if unknown:
        raise ValueError(f"expected under-floor rows from {list(UNDER_FLOOR_ROWS)}, got unknown {unknown}")
    baseline = Variant("fused (fp32)", "fused", "baseline of this group, interleaved with the rows below")
    return [baseline, *(UNDER_FLOOR_ROWS[name] for name in names)]


def scaling_variants(pair_counts: Sequence[int], cap: int) -> list[Variant]:
    rows = []
    for pairs in pair_counts:
        rows.append(Variant(f"fused@{pairs}", "fused", f"{pairs} pairs, no cap", pairs=pairs))
        rows.append(
            Variant(
                f"fused@{pairs}/cap{cap}",
                "fused",
                f"{pairs} pairs, max_views_per_forward={cap}",
                pairs=pairs,
                max_views_per_forward=cap,
            )
        )
    return rows


def _run_in_subprocess(task: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return result
    raise RuntimeError(
        f"benchmark worker {task['kind']} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
    )


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    config = BenchConfig(**task["config"])
    if task["kind"] == "parity":
        return run_parity(config)
    if task["kind"] == "check_cost":
        return run_check_cost(config)
    variants = [Variant(**v) for v in task["variants"]]
    if task["kind"] == "timing":
        return run_timing(variants, config)
    result = run_memory(variants[0], config)
    if task.get("with_timing"):  # scaling points: time them in the same fresh process
        result.update(run_timing(variants, config)["rows"][variants[0].name])
    return result


def worker_main(task_json: str) -> None:
    result = _run_task(json.loads(task_json))
    print(RESULT_MARKER + json.dumps(result), flush=True)


def machine_description(config: BenchConfig) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import open_clip

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": config.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if config.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _format_table(rows: Sequence[dict[str, Any]], floor_s: float | None) -> str:
    header = (
        f"{'variant':<18} {'pairs':>5} {'step s':>8} {'min-max s':>12} {'cpu s':>7} {'peak MB':>8} "
        f"{'step MB':>8} {'text enc':>8} {'/floor':>7} {'err vs fp32 loss, grad':>23}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        spread = f"{row['step_s_min']:.2f}-{row['step_s_max']:.2f}"
        peak = f"{row['peak_mem_mb']:.0f}" if "peak_mem_mb" in row else "-"
        step_mem = f"{row['step_mem_mb']:.0f}" if "step_mem_mb" in row else "-"
        over_floor = f"{row['step_s'] / floor_s:.2f}" if floor_s else "-"
        error = ""
        if "loss_rel_err_vs_fp32" in row:
            error = f"{row['loss_rel_err_vs_fp32']:.1e}, {row['grad_rel_err_vs_fp32']:.1e}"
        lines.append(
            f"{row['name']:<18} {row['pairs']:>5} {row['step_s']:>8.3f} {spread:>12} {row['cpu_s']:>7.2f} "
            f"{peak:>8} {step_mem:>8} {row['text_encoder_calls_per_step']:>8.1f} {over_floor:>7} {error:>23}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default="ViT-B-32", help="open_clip model name (random init, no download)")
    add(
        "--model-config",
        default=None,
        help="open_clip CLIP(**config) as JSON text or a file; overrides --model",
    )
    add("--batch", type=int, default=8, help="images per step")
    add("--pairs", type=int, default=16, help="positive (image, class) pairs per step")
    add("--image-size", type=int, default=512, help="image side")
    add("--cam-size", type=int, default=32, help="CAM map side")
    add("--steps", type=int, default=5, help="timed steps (rounds) after warm-up")
    add("--warmup", type=int, default=1, help="untimed warm-up steps")
    add("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast around every row")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--threads", type=int, default=2, help="torch intra-op threads")
    add("--seed", type=int, default=0)
    add("--json", type=Path, default=None, help="write the figures to this file")
    add("--under-floor", action="store_true", help="add the channels_last / SDPA-math / bf16 rows")
    add(
        "--compile",
        action="store_true",
        help="with --under-floor: add the torch.compile row (slow to compile)",
    )
    add(
        "--under-floor-rows",
        default="channels_last,sdpa-math,bf16",
        help=f"with --under-floor: which rows, from {','.join(UNDER_FLOOR_ROWS)} (bf16 is emulated, "
        "hence slow, on CPUs without native bf16)",
    )
    add("--under-floor-steps", type=int, default=None, help="timed rounds of the under-floor group")
    add("--scaling", default="", help="pair counts of the scaling rows, e.g. 4,16,64 (default: none)")
    add("--scaling-cap", type=int, default=16, help="max_views_per_forward of the capped scaling rows")
    add("--scaling-steps", type=int, default=3, help="timed steps of each scaling point")
    add(
        "--in-process",
        action="store_true",
        help="run everything in this process (tests; memory is then shared)",
    )
    add("--check-cost", action="store_true", help="add the cost of the input and setting checks per step")
    add("--check-cost-only", action="store_true", help="measure only the check cost (skip everything else)")
    add("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return {}
    config = BenchConfig(
        model=args.model, model_config=args.model_config, batch=args.batch, pairs=args.pairs,
        image_size=args.image_size, cam_size=args.cam_size, steps=args.steps, warmup=args.warmup,
        dtype=args.dtype, device=args.device, threads=args.threads, seed=args.seed,
    )  # fmt: skip
    run: Callable[[dict[str, Any]], dict[str, Any]] = _run_task if args.in_process else _run_in_subprocess
    config_dict = dataclasses.asdict(config)
    started, load_before = time.perf_counter(), _load_average()

    def task(
        kind: str, variants: Sequence[Variant], config_changes: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        return {
            "kind": kind,
            "config": {**config_dict, **(config_changes or {})},
            "variants": [dataclasses.asdict(v) for v in variants],
            **extra,
        }

    if args.check_cost_only:
        _progress("check cost: the checks timed alone beside a fused step")
        cost = run(task("check_cost", []))
        load_after = _load_average()
        print(
            f"\nCLIMS evaluator, {config.model if not config.model_config else 'custom CLIP config'} random "
            f"init, {config.batch} images {config.image_size}px, {config.pairs} pairs, {config.device}, "
            f"{config.threads} threads; load average {load_before} -> {load_after}"
        )
        print(_format_check_cost(cost, None))
        report_only = {"config": config_dict, "check_cost": cost, "load_average": [load_before, load_after]}
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report_only, indent=2) + "\n")
        return report_only

    variants = main_variants()
    _progress(f"timing {', '.join(v.name for v in variants)} round-robin, {config.steps} rounds")
    timing = run(task("timing", variants))
    rows: dict[str, dict[str, Any]] = timing["rows"]
    for variant in variants:
        if variant.kind == "fused" and not variant.validate:
            continue  # same memory as fused: validation allocates a few flags
        _progress(f"peak memory of {variant.name} in its own process")
        rows[variant.name].update(run(task("memory", [variant])))
    _progress("parity: voc-official evaluator vs reference, fp32")
    parity = run(task("parity", [], {"dtype": "fp32"}))

    under_floor: dict[str, dict[str, Any]] = {}
    if args.under_floor:
        names = [name.strip() for name in args.under_floor_rows.split(",") if name.strip()]
        if args.compile and "compile" not in names:
            names.append("compile")
        group = under_floor_variants(names)
        steps = {"steps": args.under_floor_steps} if args.under_floor_steps else {}
        _progress(f"under the floor: {', '.join(v.name for v in group)} round-robin")
        under_floor = run(task("timing", group, steps))["rows"]
    scaling: dict[str, dict[str, Any]] = {}
    for variant in scaling_variants([int(p) for p in args.scaling.split(",") if p.strip()], args.scaling_cap):
        _progress(f"scaling: {variant.description} in its own process")
        scaling[variant.name] = run(
            task("memory", [variant], {"steps": args.scaling_steps, "warmup": 1}, with_timing=True)
        )
    check_cost: dict[str, Any] = {}
    if args.check_cost:
        _progress("check cost: the checks timed alone beside a fused step")
        check_cost = run(task("check_cost", []))
    wall_s = time.perf_counter() - started

    fused, reference, floor = rows["fused"], rows["reference"], rows["floor"]
    ratios = {
        "reference_over_fused": reference["step_s"] / fused["step_s"],
        "fused_over_floor": fused["step_s"] / floor["step_s"],
        "mem_fused_over_reference": fused["peak_mem_mb"] / reference["peak_mem_mb"],
        # The same ratios as medians of per-round ratios (robust to load drift on a shared machine).
        "reference_over_fused_paired": reference["over_fused_paired"],
        "fused_over_floor_paired": 1.0 / floor["over_fused_paired"],
        # Process CPU time is the least load-sensitive measure of the work done on a shared machine.
        "reference_over_fused_cpu": reference["cpu_s"] / fused["cpu_s"],
        "fused_over_floor_cpu": fused["cpu_s"] / floor["cpu_s"],
        "fused_novalidate_over_floor": rows["fused-novalidate"]["step_s"] / floor["step_s"],
        "step_mem_fused_over_reference": fused["step_mem_mb"] / max(reference["step_mem_mb"], 1e-9),
    }
    machine = machine_description(config)
    report = {
        "config": config_dict,
        "machine": {**machine, "load_average_before": load_before, "load_average_after": _load_average()},
        "variants": rows,
        "ratios": ratios,
        "loss_parity_max_rel_err": parity["loss_parity_max_rel_err"],
        "parity": parity,
        "under_floor": under_floor,
        "scaling": scaling,
        "check_cost": check_cost,
        "wall_s": wall_s,
    }

    model_name = "custom CLIP config" if config.model_config else config.model
    print(
        f"\nCLIMS evaluator training step (forward + backward to the maps): {model_name} random init, "
        f"{config.batch} images {config.image_size}px, maps {config.cam_size}px, {config.pairs} pairs, "
        f"{config.dtype}, {config.device}, {config.threads} threads\n"
        f"{machine['cpu']} ({machine['cpu_capability']}), "
        f"torch {machine['torch']}, open_clip {machine['open_clip']}; load average {load_before} -> "
        f"{report['machine']['load_average_after']}\n"
        f"step s: median of {config.steps} round-robin rounds after {config.warmup} warm-up; "
        f"cpu s: process CPU time; peak MB: {fused['memory_kind']}, each variant in its own process; "
        "step MB: peak minus the "
        f"resident size before the first step; text enc: text-encoder calls per step\n"
    )
    print(_format_table(list(rows.values()), floor["step_s"]))
    if under_floor:
        base = next(iter(under_floor.values()))
        print(
            f"\nunder the floor (interleaved with their own fp32 fused baseline, {base['step_s']:.2f} s; "
            "/floor is relative to the floor scaled by fused/baseline):"
        )
        scale = fused["step_s"] / base["step_s"]
        print(_format_table(list(under_floor.values()), floor["step_s"] / scale))
    if scaling:
        print(f"\nscaling (each point in its own process, median of {args.scaling_steps} steps, 1 warm-up):")
        print(_format_table(list(scaling.values()), floor["step_s"]))
    print(
        f"\nreference/fused = {ratios['reference_over_fused']:.2f} "
        f"(cpu {ratios['reference_over_fused_cpu']:.2f}, paired {ratios['reference_over_fused_paired']:.2f}; "
        "target >= 3.0)   "
        f"fused/floor = {ratios['fused_over_floor']:.3f} (cpu {ratios['fused_over_floor_cpu']:.3f}, paired "
        f"{ratios['fused_over_floor_paired']:.3f}; target <= 1.10)   mem fused/reference = "
        f"{ratios['mem_fused_over_reference']:.2f} (target <= 0.7; "
        f"step-only {ratios['step_mem_fused_over_reference']:.2f})"
    )
    cases = " | ".join(
        f"{case}: loss {parity[case]['parts']['loss']['fused']:.7g} (voc-official) vs "
        f"{parity[case]['parts']['loss']['reference']:.7g} (reference), "
        f"grad err {parity[case]['grad_rel_err']:.1e}"
        for case in ("random_init", "similarity_shifted")
    )
    print(f"parity (fp32): max rel err {parity['loss_parity_max_rel_err']:.2e} (target <= 1e-5); {cases}")
    if check_cost:
        print(_format_check_cost(check_cost, 1.0 / rows["fused-novalidate"]["over_fused_paired"]))
    print(f"wall time {wall_s:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_suffix(args.json.suffix + ".tmp")
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        temporary.replace(args.json)  # atomic: a crash never leaves half a file
    return report


if __name__ == "__main__":
    main()
