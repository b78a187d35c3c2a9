"""clims-loss: CLIP's language supervision for weakly supervised semantic segmentation (CLIMS, CVPR 2022).

>>> import clims_loss as cl
>>> cl.BackgroundPromptRegistry.preset("voc").weights
LossWeights(otm=10.0, btm=25.0, cbs=29.5, reg=1.15)
"""

from clims_loss.clip_loading import load_open_clip
from clims_loss.collapse import (
    DEFAULT_COLLAPSE_FRACTION,
    DEFAULT_FLOOD_LEVEL,
    ClassActivation,
    CollapseCheck,
    class_activation,
    detect_collapse,
)
from clims_loss.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, UNIT_MEAN, UNIT_STD
from clims_loss.distributed import data_parallel_loss
from clims_loss.evaluator import CLIPTextDrivenEvaluator, EvaluatorOutput
from clims_loss.functional import (
    LossWeights,
    btm_loss,
    cbs_loss,
    combine_losses,
    otm_loss,
    reduce_loss,
    reg_loss,
    similarity_to_probability,
)
from clims_loss.masking import MaskedViews, masked_views, positive_pairs
from clims_loss.mining import DEFAULT_BACKGROUND_VOCABULARY, BackgroundScore, mine_backgrounds
from clims_loss.overlay import colorize, overlay_cam
from clims_loss.prompts import COCO_CLASSES, VOC_CLASSES, BackgroundPromptRegistry
from clims_loss.readiness import ClassReadiness, ReadinessReport, clip_readiness

__version__ = "0.1.0"

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "COCO_CLASSES",
    "DEFAULT_BACKGROUND_VOCABULARY",
    "DEFAULT_COLLAPSE_FRACTION",
    "DEFAULT_FLOOD_LEVEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "UNIT_MEAN",
    "UNIT_STD",
    "VOC_CLASSES",
    "BackgroundPromptRegistry",
    "BackgroundScore",
    "CLIPTextDrivenEvaluator",
    "ClassActivation",
    "ClassReadiness",
    "CollapseCheck",
    "EvaluatorOutput",
    "LossWeights",
    "MaskedViews",
    "ReadinessReport",
    "__version__",
    "btm_loss",
    "cbs_loss",
    "class_activation",
    "clip_readiness",
    "colorize",
    "combine_losses",
    "data_parallel_loss",
    "detect_collapse",
    "load_open_clip",
    "masked_views",
    "mine_backgrounds",
    "otm_loss",
    "overlay_cam",
    "positive_pairs",
    "reduce_loss",
    "reg_loss",
    "similarity_to_probability",
]
