"""Train or fine-tune an open_clip model on (image, caption) pairs.

One function, two uses:

* real data: the camera-ready CLIMS recipe, fine-tuning CLIP on label captions ("a photo of {class
  names}.") with lr 5e-5, 20 epochs and weight decay 0.003 (``PAPER_FINETUNE``)::

      samples = label_caption_samples(voc_root, "train_aug", VOC_CLASSES)
      train_clip(samples, model_name="ViT-B-32", pretrained=<openai weights file>, quick_gelu=True,
                 **PAPER_FINETUNE, batch_size=..., out_path=...)

* generated data: a small CLIP trained from scratch on a plug-in's captions (stage ``train_clip`` with a
  caption source of ``clip_captions``). The toy world's tiny CLIP ``clims-toy-clip``, its corpora and its
  zero-shot report live in ``clims_pipeline.toy.clip``.

The checkpoint is a plain ``{"state_dict": ...}`` file, so ``open_clip.create_model(name,
pretrained=<file>)`` (and therefore ``CLIPTextDrivenEvaluator.from_pretrained(name, pretrained=<file>)``)
loads it, once the model's config is known to open_clip (``clip_setup.register_clip_config``; importing
``clims_pipeline.toy`` registers ``clims-toy-clip``).

CPU note: these models are small; on a shared 2-core machine ``torch.set_num_threads(1)`` was ~10x
faster than 2 threads for batch-8 steps (OpenMP threads spin while other processes hold the cores).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

import clims_loss as cl

from .distributed import kill_if_test_step
from .files import load_torch_file

# The paper's CLIP fine-tuning on label captions (camera-ready CLIMS).
PAPER_FINETUNE: dict[str, float] = {"lr": 5e-5, "epochs": 20, "weight_decay": 0.003}
ImageSource = str | os.PathLike[str] | np.ndarray | Image.Image


class _OpenClipModel(Protocol):
    """What this module uses of an open_clip CLIP (open_clip ships no type information)."""

    logit_scale: torch.Tensor  # a Parameter: CLIP's log temperature
    visual: Any  # the image tower (ModifiedResNet, VisionTransformer, ...): image_size, output_dim

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


def _open_clip_parts(model: torch.nn.Module) -> _OpenClipModel:
    """``model`` as the open_clip CLIP that ``create_model`` built (the same object, typed)."""
    return cast(_OpenClipModel, model)


@dataclass(frozen=True)
class Augment:
    """Batch augmentation for CLIP training.

    ``mask_prob``: fraction of the maskable images (see ``train_clip``'s ``maskable``) multiplied by a
    random soft mask. The CLIMS evaluator shows CLIP ``X * P_k`` and ``X * (1 - P_k)``, images whose
    masked-out part is black (``space="pixel"``, the evaluator's default masking) or the mean colour
    (``space="normalised"``, its ``pass_through`` mode), with soft borders; a CLIP that never saw such
    images would judge the masking, not the content. The mask keeps ``keep`` (uniform in the range) of
    the image in smooth random blobs.
    ``flip_prob``: horizontal flips (captions do not say left or right).
    ``dark_range``: the brightness factors (log-uniform) of the samples ``train_clip`` is told to darken
    (its ``darken``): copies of scenes captioned as dark pictures. Without them a tiny CLIP reads a
    scene dimmed a thousandfold as well as the scene, and the CLIMS maps collapse to ``P ~ 0``: the
    foreground view ``X * P`` of a near-zero map still matches the class (docs/toyworld.md).
    """

    mask_prob: float = 0.5
    keep: tuple[float, float] = (0.4, 0.9)
    flip_prob: float = 0.5
    space: str = "normalised"
    dark_range: tuple[float, float] = (1e-4, 0.15)

    def __post_init__(self) -> None:
        if self.space not in ("pixel", "normalised"):
            raise ValueError(f"expected augment.space 'pixel' or 'normalised', got {self.space!r}")
        low, high = self.dark_range
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"expected augment.dark_range with 0 < low <= high <= 1, got {self.dark_range}")


NO_AUGMENT = Augment(mask_prob=0.0, flip_prob=0.0)


def random_soft_masks(
    batch: int, size: int, keep: tuple[float, float], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(batch, 1, size, size) masks in [0, 1] from upsampled noise; sharpness varies from soft to hard."""
    cells = int(torch.randint(2, 5, (1,), generator=generator).item())
    noise = torch.rand(batch, 1, cells, cells, generator=generator)
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).flatten(1)
    keep_fraction = torch.empty(batch, 1).uniform_(*keep, generator=generator)
    # Threshold at the (1 - keep) quantile so each mask keeps about the requested area.
    threshold = torch.quantile(field, 1 - keep_fraction.squeeze(1), dim=1).diagonal().unsqueeze(1)
    sharpness = torch.empty(batch, 1).uniform_(4.0, 40.0, generator=generator)
    masks = torch.sigmoid((field - threshold) * sharpness / field.std(dim=1, keepdim=True).clamp_min(1e-6))
    return masks.view(batch, 1, size, size).to(device)


# ----------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------


def label_caption(class_names: Sequence[str], template: str = "a photo of {}.") -> str:
    """The paper's label caption: "a photo of person, car and dog."."""
    names = list(class_names)
    if not names:
        raise ValueError("expected at least one class name for a label caption")
    phrase = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return template.format(phrase)


def label_caption_samples(
    voc_root: str | os.PathLike[str],
    split: str,
    class_names: Sequence[str],
    *,
    template: str = "a photo of {}.",
) -> list[tuple[Path, str]]:
    """(image path, label caption) for a VOC-layout data set: the captions of the paper's CLIP fine-tuning.

    ``class_names[i]`` names label ``i + 1`` of ``cls_labels.json``; ids without labels are skipped.
    """
    root = Path(voc_root)
    labels = json.loads((root / "cls_labels.json").read_text())
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    samples = []
    for sample_id in ids:
        present = labels.get(sample_id)
        if present is None:
            raise KeyError(f"id {sample_id!r} of split {split!r} has no entry in cls_labels.json")
        if present:
            samples.append(
                (_find_image(root, sample_id), label_caption([class_names[i - 1] for i in present], template))
            )
    return samples


def _find_image(root: Path, sample_id: str) -> Path:
    for ext in (".jpg", ".png", ".jpeg"):
        candidate = root / "JPEGImages" / f"{sample_id}{ext}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no image for id {sample_id!r} under {root / 'JPEGImages'}")


def load_image(source: ImageSource, size: int) -> np.ndarray:
    """uint8 (size, size, 3): shorter side resized to ``size``, then centre-cropped."""
    if isinstance(source, np.ndarray):
        image = Image.fromarray(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        image = Image.open(source)
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        image = image.resize(
            (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC
        )
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, np.uint8)


def _load_images(sources: Sequence[ImageSource], size: int, progress: bool) -> torch.Tensor:
    images = np.empty((len(sources), size, size, 3), np.uint8)
    for index, source in enumerate(_tqdm(sources, "loading images", progress)):
        images[index] = load_image(source, size)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _tqdm(iterable: Any, description: str, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _normaliser(model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own preprocessing mean/std, as (1, 3, 1, 1) tensors."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return (
        torch.tensor(mean, device=device).view(1, 3, 1, 1),
        torch.tensor(std, device=device).view(1, 3, 1, 1),
    )


def _image_size(model: torch.nn.Module) -> int:
    size = _open_clip_parts(model).visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: gains, biases, embeddings and the logit scale are left alone, as in CLIP."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.ndim >= 2 and "embedding" not in name and "token" not in name
        (decay if is_matrix else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_checkpoint(model: torch.nn.Module, out_path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    """Atomically write ``{"state_dict", "clims_meta"}``: a file open_clip's loader accepts as is."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "clims_meta": meta}, tmp)
    os.replace(tmp, out_path)


def create_model(
    model_name: str,
    pretrained: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    quick_gelu: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """open_clip model + tokenizer through ``clims_loss.load_open_clip``; ``pretrained`` is a tag or a
    checkpoint file. ``quick_gelu``: OpenAI's CLIP weights (and models tuned from them) need QuickGELU."""
    return cl.load_open_clip(model_name, pretrained, quick_gelu=quick_gelu, device=_default_device(device))


@dataclass
class ClipTrainingResult:
    """The trained model (in eval mode), its per-epoch history and where the checkpoint was written."""

    model: torch.nn.Module
    history: dict[str, Any]
    out_path: Path


def train_clip(
    samples: Sequence[tuple[ImageSource, str]],
    *,
    model_name: str,
    pretrained: str | os.PathLike[str] | None = None,
    epochs: int = 10,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    out_path: str | os.PathLike[str],
    augment: Augment | None = Augment(),
    warmup_fraction: float = 0.05,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    progress: bool = True,
    quick_gelu: bool = False,
    maskable: Sequence[bool] | None = None,
    fixed_logit_scale: float | None = None,
    darken: Sequence[bool] | None = None,
) -> ClipTrainingResult:
    """Train (``pretrained=None``) or fine-tune an open_clip model contrastively on (image, caption) pairs.

    Images (paths, uint8 HWC arrays or PIL images) are resized to the model's input size once and kept
    in memory as uint8, which suits the toy world (12k x 64 px = 150 MB) and VOC's 10,582 images at
    224 px (1.6 GB). The loss is ``open_clip.ClipLoss``; AdamW with linear warm-up then cosine decay;
    the logit scale is clamped at 100 as in CLIP. After each epoch the model is written atomically to
    ``out_path`` and the optimizer state to ``<out_path>.resume``, so an interrupted run resumes (with
    ``resume``); a finished run is not repeated. A resumed run sees the same batches as an uninterrupted
    one, with the same random masks (the mask generator's state is saved with the optimizer's).

    ``maskable`` says which samples the augmentation may mask (default: all). A mask can hide the object
    a caption names, which teaches CLIP that the object's surroundings are the object; samples whose
    caption stays true under any mask (background-only images, objects cut out on black) are the safe
    ones to mask.

    ``darken`` says which samples to darken each time they are drawn, by a factor from
    ``augment.dark_range`` (default: none); see ``Augment``.

    ``fixed_logit_scale`` holds CLIP's temperature at that value (e.g. 100, where OpenAI's CLIP ends)
    instead of learning it. With the learned scale the tiny CLIP stopped near 15 and spread its cosine
    similarities over -0.2..0.8; at 100 they sit in a narrow band like ViT-B/32's (about 0.2-0.3), the
    scale the CLIMS loss weights were chosen for.
    """
    if not samples:
        raise ValueError("expected at least one (image, caption) sample, got none")
    if epochs < 1 or batch_size < 2:
        raise ValueError(
            f"expected epochs >= 1 and batch_size >= 2, got epochs={epochs}, batch_size={batch_size}"
        )
    maskable_flags = _per_sample_flags(maskable, len(samples), "maskable", default=True)
    darken_flags = _per_sample_flags(darken, len(samples), "darken", default=False)
    if bool(darken_flags.any()) and augment is None:
        raise ValueError("darken needs an augmentation (augment=None turns darkening off)")
    device = _default_device(device)
    torch.manual_seed(seed)
    random.seed(seed)
    model, tokenizer = create_model(model_name, pretrained, device, quick_gelu=quick_gelu)
    clip = _open_clip_parts(model)
    if fixed_logit_scale is not None:
        if not 1.0 <= fixed_logit_scale <= 100.0:
            raise ValueError(f"expected fixed_logit_scale in [1, 100], got {fixed_logit_scale}")
        clip.logit_scale.data.fill_(math.log(fixed_logit_scale))
        clip.logit_scale.requires_grad_(False)
    size = _image_size(model)
    mean, std = _normaliser(model, device)
    images = _load_images([s[0] for s in samples], size, progress)
    tokens = tokenizer([s[1] for s in samples])

    steps_per_epoch = max(1, len(samples) // batch_size)  # drop the ragged last batch: ClipLoss wants pairs
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    warmup_steps = max(1, int(total_steps * warmup_fraction))
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup_steps)
            * (
                0.5
                * (
                    1
                    + math.cos(
                        math.pi * min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
                    )
                )
            )
        ),
    )
    loss_fn = open_clip.ClipLoss()
    meta = {
        "model_name": model_name,
        "pretrained": str(pretrained) if pretrained else None,
        "epochs": epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "seed": seed,
        "samples": len(samples),
        "augment": asdict(augment) if augment else None,
        "total_steps": total_steps,
        "quick_gelu": quick_gelu,
        "fixed_logit_scale": fixed_logit_scale,
        "maskable": int(maskable_flags.sum()),
        "darkened": int(darken_flags.sum()),
    }
    history: dict[str, Any] = {"meta": meta, "epochs": []}
    resume_path = Path(str(out_path) + ".resume")
    start_epoch, step = 0, 0
    mask_state: torch.Tensor | None = None
    if resume and resume_path.exists():
        state = load_torch_file(
            resume_path,
            f"delete it to train {out_path} from the start (it is only a resume point)",
            map_location=device,
        )
        if state["meta"] == meta:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, step, history = state["epoch"], state["step"], state["history"]
            mask_state = state.get("mask_generator")
            if progress:
                print(f"resuming from {resume_path} (epoch {start_epoch}, step {step})", flush=True)
        elif progress:
            print(f"{resume_path} is from other settings; training from the start")
    generator = torch.Generator().manual_seed(seed)
    mask_generator = torch.Generator().manual_seed(seed + 1)
    if mask_state is not None:  # the masks a resumed run draws are the ones the uninterrupted run drew
        mask_generator.set_state(mask_state)
    # Shuffle orders are drawn for every epoch up front so a resumed run sees the same batches.
    orders = [torch.randperm(len(samples), generator=generator) for _ in range(epochs)]
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        model.train()
        losses = []
        batches = range(steps_per_epoch)
        bar = _tqdm(batches, f"clip epoch {epoch + 1}/{epochs}", progress, leave=False)
        for batch_index in bar:
            if step >= total_steps:
                break
            index = orders[epoch][batch_index * batch_size : (batch_index + 1) * batch_size]
            pixels = images[index].to(device).float() / 255.0
            if augment is not None:
                pixels = _augment(
                    pixels, augment, mask_generator, maskable_flags[index], mean, std, darken_flags[index]
                )
            else:
                pixels = (pixels - mean) / std
            image_features, text_features, logit_scale = _features(model(pixels, tokens[index].to(device)))
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
            kill_if_test_step(step)
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "logit_scale": clip.logit_scale.exp().item(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        history["epochs"].append(record)
        if progress:
            print(
                f"clip epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, "
                f"logit scale {record['logit_scale']:.1f}, {record['seconds']} s"
            )
        save_checkpoint(model, out_path, {**meta, "epoch": epoch + 1, "step": step})
        tmp = resume_path.with_name(resume_path.name + ".tmp")
        torch.save(
            {
                "meta": meta,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "history": history,
                "mask_generator": mask_generator.get_state(),
            },
            tmp,
        )
        os.replace(tmp, resume_path)
    if not Path(out_path).exists():  # a resumed run that was already complete still leaves the model
        save_checkpoint(model, out_path, {**meta, "epoch": epochs, "step": step})
    history["train_seconds"] = round(time.perf_counter() - started, 1)
    model.eval()
    return ClipTrainingResult(model=model, history=history, out_path=Path(out_path))


def _per_sample_flags(flags: Sequence[bool] | None, count: int, name: str, default: bool) -> torch.Tensor:
    """(count,) bool tensor of ``flags`` (``default`` everywhere for None); a clear error on a bad length."""
    if flags is None:
        return torch.full((count,), default, dtype=torch.bool)
    if len(flags) != count:
        raise ValueError(f"expected one {name} flag per sample ({count}), got {len(flags)}")
    return torch.tensor(list(flags), dtype=torch.bool)


def _features(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, text features, logit scale) from either of open_clip's output forms."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def _augment(
    pixels: torch.Tensor,
    augment: Augment,
    generator: torch.Generator,
    maskable: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    darken: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flip, darken and mask a batch of [0, 1] pixels (B, 3, S, S); returns it normalised with
    ``mean``/``std``. ``darken`` (B,) bool: which images to multiply by a log-uniform factor from
    ``augment.dark_range``."""
    batch, _, size, _ = pixels.shape
    if darken is not None and bool(darken.any()):
        low, high = augment.dark_range
        factor = torch.empty(batch).uniform_(math.log(low), math.log(high), generator=generator).exp()
        factor = torch.where(darken.cpu(), factor, torch.ones_like(factor)).to(pixels.device)
        pixels = pixels * factor.view(-1, 1, 1, 1)
    if augment.flip_prob > 0:
        flip = (torch.rand(batch, generator=generator) < augment.flip_prob).to(pixels.device)
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    masks = None
    if augment.mask_prob > 0:
        chosen = (torch.rand(batch, generator=generator) < augment.mask_prob) & maskable.cpu()
        masks = random_soft_masks(batch, size, augment.keep, generator, pixels.device)
        masks = torch.where(chosen.to(pixels.device).view(-1, 1, 1, 1), masks, torch.ones_like(masks))
        if augment.space == "pixel":
            pixels = pixels * masks
    pixels = (pixels - mean) / std
    if masks is not None and augment.space == "normalised":
        pixels = pixels * masks
    return pixels


# ----------------------------------------------------------------------------------------------------
# Measuring helpers: embeddings and average precision (the toy world's report, toy/clip.py, uses them)
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def _encode_images(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L2-normalised image embeddings (N, D), in chunks; (0, D) for no images."""
    clip = _open_clip_parts(model)
    out = [
        F.normalize(clip.encode_image(pixels[i : i + batch_size]), dim=-1)
        for i in range(0, len(pixels), batch_size)
    ]
    if not out:
        return torch.zeros(0, clip.visual.output_dim, device=pixels.device)
    return torch.cat(out)


@torch.no_grad()
def _encode_texts(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], device: torch.device
) -> torch.Tensor:
    return F.normalize(_open_clip_parts(model).encode_text(tokenizer(list(texts)).to(device)), dim=-1)


def _mean(values: np.ndarray) -> float:
    """Mean of a possibly empty array; NaN (not a warning) when empty."""
    return float(np.mean(values)) if np.size(values) else float("nan")


def _average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())
