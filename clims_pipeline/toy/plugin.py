"""The toy world as a pipeline plug-in: its data source, prompt registry, tiny CLIP and preset.

Loaded through the ``clims_pipeline.plugins`` entry point (``setup.cfg``); it plugs in through the same
registries a user's own data set would use (``data.register_data_source``, ``config.register_preset``,
``clims_loss.BackgroundPromptRegistry.register``, open_clip's model configs, ``clip_captions``). Nothing
outside this sub-package names the toy world.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import clims_loss as cl

from ..clip_captions import register_caption_source
from ..config import register_preset
from ..data import DataSourceSpec, VOCSource, register_data_source
from .clip import TOY_CLIP_CONFIG, register_toy_clip_config, toy_caption_corpus
from .experiment import toy_registry
from .pipeline import DEFAULT_TOY_WORKDIR, TOY_STAGES, ensure_toy_world, toy_world_root
from .preset import apply_toy_preset
from .world import TOY_CLASSES

#: The name of the toy world everywhere it is registered (data source, preset, prompt registry, captions).
TOY = "toy"


class ToySource(VOCSource):
    """The procedural toy world: the VOC layout with its six classes."""

    name = TOY

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.class_names = TOY_CLASSES

    def fingerprint(self) -> str:
        """The root and the world's own metadata (its settings and statistics): a world regenerated with
        other settings in the same place invalidates what was trained on the old one, and cached labels."""
        metadata = Path(self.root) / "toyworld.json"
        identity = hashlib.sha256(metadata.read_bytes()).hexdigest()[:16] if metadata.is_file() else "none"
        return f"{self.name}:{self.root}:{identity}"


def _register() -> None:
    if TOY not in cl.BackgroundPromptRegistry.available_presets():
        cl.BackgroundPromptRegistry.register(TOY, toy_registry)
    register_toy_clip_config()
    register_caption_source(TOY, toy_caption_corpus)
    register_preset(
        TOY,
        apply_toy_preset,
        caveat="The `toy` preset runs small networks on the procedural toy world (docs/toyworld.md): its "
        "numbers are not comparable with the paper's VOC figures beside them.",
        image_size="small",
    )
    register_data_source(
        DataSourceSpec(
            name=TOY,
            build=lambda root, cache_dir: ToySource(root),
            root_help="a toy world directory (generated into <workdir>/toyworld when no root is given)",
            prompt_presets={"paper": TOY, "official": TOY},
            eval_split="val",
            default_preset=TOY,
            fallback=True,
            default_workdir=DEFAULT_TOY_WORKDIR,
            default_stages=TOY_STAGES,
            default_root=toy_world_root,
            prepare=ensure_toy_world,
        )
    )


_register()

__all__: list[Any] = ["TOY", "TOY_CLIP_CONFIG", "ToySource"]
