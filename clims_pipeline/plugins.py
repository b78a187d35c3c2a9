"""Plug-ins: packages that add data sources, presets, prompt registries or caption sources.

A plug-in is a module named in the ``clims_pipeline.plugins`` entry-point group; importing it registers
what it adds (``data.register_data_source``, ``config.register_preset``, ``config.register_config_section``,
``clip_captions.register_caption_source``, ``clims_loss.BackgroundPromptRegistry.register``). The toy world
ships as one (``setup.cfg``); a user's own package can add another the same way.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

GROUP = "clims_pipeline.plugins"
_loaded: dict[str, str] = {}


def load_plugins() -> dict[str, str]:
    """Import every registered plug-in once; return {name: module}. A plug-in that fails to import is
    skipped with a warning naming it and the error (the rest of the pipeline works without it)."""
    for entry in entry_points(group=GROUP):
        if entry.name in _loaded:
            continue
        try:
            importlib.import_module(entry.value)
        except ImportError as error:
            warnings.warn(
                f"pipeline plug-in {entry.name!r} ({entry.value}) not loaded: {error}", stacklevel=2
            )
            continue
        _loaded[entry.name] = entry.value
    return dict(_loaded)
