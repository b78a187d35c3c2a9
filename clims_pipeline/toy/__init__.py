"""The toy world: a procedural data set with exact masks and captions, its tiny CLIP and its preset.

Importing the package registers it with the pipeline (``plugin``), as the ``clims_pipeline.plugins`` entry
point does, so that ``clims_pipeline.toy.experiment`` and the benchmarks find the toy preset too.
"""

from . import plugin as plugin
from . import world_second as world_second  # registers the second world's kind
