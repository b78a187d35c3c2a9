"""What the CLIP-using stages share: the open_clip configs, the CLIP checkpoint, the prompts, the evaluator.

``train_clip`` writes a CLIP, ``mine_backgrounds`` ranks background terms with it and ``train_clims``
freezes it in the evaluator; all three resolve the CLIP, its checkpoint and the prompt registry here, so the
stages themselves import nothing from each other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

import clims_loss as cl

from .config import SMOKE_CLIP_NAME, PipelineConfig
from .context import StageContext
from .data import DATASET_PROMPTS, RECIPE_PRESETS, SegmentationSource, data_source_spec
from .runstate import output_digest, verify_file

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: The value of ``train_clims.clip_pretrained`` that means "the checkpoint stage train_clip writes".
FROM_TRAIN_CLIP = "train_clip"

#: The registry fields that ``--backgrounds FILE`` takes from the file; the variant defines all others.
BACKGROUND_FIELDS = ("class_backgrounds", "global_backgrounds", "background_template", "background_scores")


def register_clip_config(path: Path) -> None:
    """Make an open_clip model-config JSON known to open_clip under its file stem (idempotent)."""
    if not path.is_file():
        raise FileNotFoundError(f"train_clims.clip_config: no such open_clip model config: {path}")
    if path.stem not in open_clip.list_models():
        open_clip.add_model_config(path)


def register_clip_configs(ctx: StageContext) -> None:
    """The shipped smoke config, and the run's own ``train_clims.clip_config`` when it names one."""
    register_clip_config(CONFIG_DIR / f"{SMOKE_CLIP_NAME}.json")
    if ctx.config.train_clims.clip_config:
        register_clip_config(Path(ctx.config.train_clims.clip_config).expanduser())


def clip_directory(ctx: StageContext) -> Path:
    return ctx.workdir / "train_clip"


def clip_checkpoint_path(ctx: StageContext) -> Path:
    return clip_directory(ctx) / "model.pt"


def resolve_clip_pretrained(ctx: StageContext) -> str | None:
    """``train_clims.clip_pretrained`` as a tag or file for open_clip (None: random weights).

    ``"train_clip"`` becomes the checkpoint that stage wrote, after checking it against the size and sha256
    in its manifest (a truncated or changed CLIP raises :class:`DamagedFileError` naming it and the stage to
    rerun): train_clims and mine_backgrounds load it through here."""
    value = ctx.config.train_clims.clip_pretrained
    if value == FROM_TRAIN_CLIP:
        path = clip_checkpoint_path(ctx)
        if not path.exists():
            raise FileNotFoundError(
                f"train_clims.clip_pretrained=train_clip reads {path}: run stage train_clip"
            )
        verify_file(path, "train_clip")
        return str(path)
    return None if value in ("", "none") else value


def clip_inputs(ctx: StageContext) -> tuple[str, ...]:
    """The stage whose output is the evaluator's CLIP, when it comes from this run (``train_clip``)."""
    return ("train_clip",) if ctx.config.train_clims.clip_pretrained == FROM_TRAIN_CLIP else ()


def clip_identity(ctx: StageContext) -> dict[str, Any]:
    """What identifies the evaluator's CLIP in a fingerprint: its name and where its weights come from."""
    value = ctx.config.train_clims.clip_pretrained
    identity: dict[str, Any] = {"clip": ctx.config.train_clims.clip, "clip_pretrained": value}
    if value == FROM_TRAIN_CLIP:
        identity["train_clip"] = output_digest(clip_directory(ctx), "train_clip")
    return identity


def load_clip(ctx: StageContext) -> tuple[torch.nn.Module, Any]:
    """The run's CLIP (random weights are seeded like every rank's) and its tokenizer."""
    register_clip_configs(ctx)
    torch.manual_seed(ctx.seed)
    return cl.load_open_clip(ctx.config.train_clims.clip, resolve_clip_pretrained(ctx), device=ctx.device)


# ------------------------------------------------------------------------------------------- prompts


#: The ``train_clims`` fields that change the registry's recipe when set ("" / None keep the registry's).
RECIPE_FIELDS = (
    "template",
    "background_template",
    "cbs_threshold",
    "cbs_prompt_reduction",
    "cbs_reduction",
    "pair_reduction",
    "reg_positive_only",
    "masking",
)


def recipe_overrides(config: PipelineConfig) -> dict[str, Any]:
    """The recipe fields the run sets (``--template``, ``--set train_clims.cbs_reduction=...``)."""
    values = {name: getattr(config.train_clims, name) for name in RECIPE_FIELDS}
    return {name: value for name, value in values.items() if value not in ("", None)}


def prompts_source(config: PipelineConfig, source: SegmentationSource) -> str:
    """Where the registry comes from: ``dataset`` (the data set's class file), a registry JSON file, or a
    preset name. A data set that declares its classes takes them unless ``train_clims.prompts`` names
    something other than the data source's default preset for the variant."""
    prompts = config.train_clims.prompts
    default = data_source_spec(config.dataset).prompt_presets.get(config.variant)
    if source.class_set is not None and prompts == default:
        return DATASET_PROMPTS
    return prompts


def registry_for(config: PipelineConfig, source: SegmentationSource) -> cl.BackgroundPromptRegistry:
    """The run's prompt registry before backgrounds (:func:`resolve_backgrounds`): the preset, registry file
    or class set (:func:`prompts_source`), with the recipe fields the run sets; its classes must be the data
    set's, in number."""
    prompts = prompts_source(config, source)
    if prompts == DATASET_PROMPTS:
        if source.class_set is None:
            raise ValueError(
                f"train_clims.prompts={DATASET_PROMPTS}: the {config.dataset} data at {source.root} declares "
                f"no class file (--classes, or classes.txt in its root)"
            )
        recipe = cl.BackgroundPromptRegistry.preset(RECIPE_PRESETS[config.variant])
        registry = source.class_set.prompt_registry(recipe)
        origin = f"the class file {source.class_set.path}"
    elif prompts.endswith(".json") or Path(prompts).expanduser().is_file():
        try:
            registry = cl.BackgroundPromptRegistry.from_json(Path(prompts).expanduser())
        except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
            raise ValueError(
                f"train_clims.prompts: {prompts} is not a readable registry JSON: {error}"
            ) from None
        origin = f"the registry {prompts}"
    else:
        try:
            registry = cl.BackgroundPromptRegistry.preset(prompts)
        except KeyError as error:
            raise ValueError(
                f"train_clims.prompts: {error.args[0]}; or give a registry JSON file, or "
                f"'{DATASET_PROMPTS}' (the data set's class file)"
            ) from None
        origin = f"the prompt preset {prompts!r}"
    overrides = recipe_overrides(config)
    if overrides:
        try:
            registry = registry.replace(**overrides)
        except (ValueError, TypeError) as error:
            names = ", ".join(f"train_clims.{name}={value!r}" for name, value in overrides.items())
            raise ValueError(f"{names}: {error}") from None
    if len(registry.class_names) != source.num_classes:
        raise ValueError(
            f"{origin} has {len(registry.class_names)} classes ({', '.join(registry.class_names)}), the "
            f"{config.dataset} data at {source.root} has {source.num_classes}: give the data set's class "
            f"file (--classes) or a registry written for it (--write-registry)"
        )
    return registry


def base_registry(ctx: StageContext) -> cl.BackgroundPromptRegistry:
    """The run's prompt registry before backgrounds (:func:`registry_for`)."""
    return registry_for(ctx.config, ctx.source)


def registry_identity(ctx: StageContext) -> dict[str, Any]:
    """What identifies the registry in a fingerprint beyond ``train_clims.prompts``: the digest of the
    registry when it comes from a file or class set or the run changes its recipe (empty for a plain
    preset, so fingerprints of preset runs stay as they were)."""
    if prompts_source(ctx.config, ctx.source) in cl.BackgroundPromptRegistry.available_presets() and not (
        recipe_overrides(ctx.config)
    ):
        return {}
    text = json.dumps(base_registry(ctx).to_dict(), sort_keys=True)
    return {"registry_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def mined_path(ctx: StageContext) -> Path:
    """The registry that stage ``mine_backgrounds`` writes (and ``--backgrounds mined`` reads)."""
    return ctx.workdir / "mine_backgrounds" / "mined_backgrounds.json"


def resolve_backgrounds(
    ctx: StageContext, *, must_exist: bool = True
) -> tuple[cl.BackgroundPromptRegistry | None, dict[str, Any]]:
    """The registry ``train_clims`` uses and its identity (part of the stage's fingerprint).

    ``preset``: the variant's registry. ``mined``: ``<workdir>/mine_backgrounds/mined_backgrounds.json``.
    Anything else: a registry JSON file. From a file only the background fields (:data:`BACKGROUND_FIELDS`)
    are taken; class names must match the variant's, whose templates, weights and CBS settings stay.
    With ``must_exist=False`` a missing mined file (still to be written by an earlier stage of this run)
    returns ``(None, {})``.
    """
    choice = ctx.config.train_clims.backgrounds or "preset"
    base = base_registry(ctx)
    if choice == "preset":
        return base, {"backgrounds": "preset"}
    if choice == "mined":
        path = mined_path(ctx)
        if not path.is_file():
            if not must_exist:
                return None, {}
            raise FileNotFoundError(
                f"--backgrounds mined: missing {path}; run the mine_backgrounds stage first "
                f"(e.g. --stages mine_backgrounds,train_clims), or pass a registry JSON file"
            )
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--backgrounds: {choice!r} is neither 'preset', 'mined' nor an existing registry JSON file"
            )
    try:
        loaded = cl.BackgroundPromptRegistry.from_json(path)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"--backgrounds: {path} is not a valid registry JSON: {error}") from error
    if tuple(loaded.class_names) != tuple(base.class_names):
        raise ValueError(
            f"--backgrounds: {path} has classes {list(loaded.class_names)}, the run's prompt registry "
            f"{base.name!r} has {list(base.class_names)}"
        )
    registry = base.replace(name=loaded.name, **{name: getattr(loaded, name) for name in BACKGROUND_FIELDS})
    if registry.weights.cbs != 0 and not registry.uses_cbs:
        raise ValueError(
            f"--backgrounds: {path} holds no background terms but the CBS weight is {registry.weights.cbs}; "
            f"add terms to it (or mine with a lower --mine-margin)"
        )
    used = {name: registry.to_dict()[name] for name in BACKGROUND_FIELDS}
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode("utf-8")).hexdigest()
    return registry, {"backgrounds": choice, "file": str(path.resolve()), "sha256": digest}


def build_evaluator(ctx: StageContext, registry: cl.BackgroundPromptRegistry) -> cl.CLIPTextDrivenEvaluator:
    """The frozen-CLIP evaluator of ``train_clims`` over ``registry`` (from :func:`resolve_backgrounds`)."""
    if len(registry.class_names) != ctx.source.num_classes:
        raise ValueError(
            f"prompt registry {registry.name!r} has {len(registry.class_names)} classes, the "
            f"{ctx.config.dataset} data {ctx.source.num_classes}"
        )
    given = ctx.config.train_clims.loss_weights
    register_clip_configs(ctx)
    torch.manual_seed(ctx.seed)  # every rank builds the same CLIP: random weights are seeded identically
    return cl.CLIPTextDrivenEvaluator.from_pretrained(
        ctx.config.train_clims.clip,
        pretrained=resolve_clip_pretrained(ctx),
        prompts=registry,
        weights=cl.LossWeights(**given) if given else None,  # None: the registry's own weights
        device=ctx.device,
        image_mean=cl.IMAGENET_MEAN,  # how the pipeline normalises its images
        image_std=cl.IMAGENET_STD,
    )


def seeded_subset(image_ids: list[str], max_images: int | None, seed: int, setting: str) -> list[str]:
    """A seeded random subset of ``max_images`` ids in list order (all of them for None); ``setting`` names
    the option in the error for a value below 1."""
    if max_images is None or max_images >= len(image_ids):
        return image_ids
    if max_images < 1:
        raise ValueError(f"{setting}: expected >= 1 or null, got {max_images}")
    chosen = np.random.default_rng(seed).choice(len(image_ids), size=max_images, replace=False)
    return [image_ids[i] for i in sorted(chosen)]
