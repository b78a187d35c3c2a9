"""Class names, prompt templates, co-occurring background prompts and the loss settings of a variant.

A `BackgroundPromptRegistry` is everything about a CLIMS run that is words or numbers rather
than tensors: which classes exist and how they are written, which backgrounds each class is not
allowed to cover, and how the four losses are weighted and reduced. Presets reproduce the paper and
both official code versions; ``register`` adds your own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from clims_loss._validation import (
    check_bool,
    check_choice,
    check_eps,
    check_mapping,
    check_real,
    check_str,
    check_strings,
)
from clims_loss.functional import DEFAULT_EPS, SIMILARITY_MODES, LossWeights
from clims_loss.masking import MASKING_MODES

__all__ = ["COCO_CLASSES", "VOC_CLASSES", "BackgroundPromptRegistry"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# VOC names as the official improved code writes them for CLIP: spaces, and "player" for "person".
_VOC_CLIP_NAMES = tuple(
    {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}.get(n, n)
    for n in VOC_CLASSES
)
_VOC_OFFICIAL_NAMES = tuple("player" if n == "person" else n for n in _VOC_CLIP_NAMES)
_COCO_OFFICIAL_NAMES = tuple("player" if n == "person" else n for n in COCO_CLASSES)

_VOC_OFFICIAL_BACKGROUNDS = (
    "tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks",
)  # fmt: skip

_COCO_OFFICIAL_BACKGROUNDS = (
    "street sign", "mountain", "video game", "men", "track", "bus stop", "cabinet", "tray", "plate",
    "shirt", "city street", "runway", "tower", "ramp", "grass", "pillow", "urinal", "lake", "brick",
    "fence", "shower", "airport", "animal", "shower curtain", "road", "mirror", "jacket", "church",
    "snow", "fruit", "hay", "floor", "field", "street", "mouth", "steam engine", "cheese", "river",
    "tree branch", "suit", "child", "soup", "desk", "tub", "tennis court", "teeth", "bridge", "sky",
    "officer", "sidewalk", "dock", "tree", "court", "rock", "board", "branch", "pan", "box", "body",
    "salad", "dirt", "leaf", "hand", "highway", "vegetable", "computer monitor", "door", "meat",
    "pair", "beach", "harbor", "ocean", "baseball player", "girl", "market", "window", "blanket",
    "boy", "woman", "bat", "baby", "flower", "wall", "bath tub", "tarmac", "tennis ball", "roll",
    "park",
)  # fmt: skip


def _unknown(kind: str, name: str, known: Iterable[str]) -> KeyError:
    plural = "classes" if kind == "class" else f"{kind}s"
    return KeyError(f"unknown {kind} {name!r}; known {plural}: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class BackgroundPromptRegistry:
    """Prompts and loss settings of one CLIMS variant.

    Attributes:
        name: a label for logs and JSON.
        class_names: the ``K`` class names in label order, as written into the prompts.
        template: object prompt, ``template.format(class_name)`` (the paper: ``"a photo of {}."``).
        class_backgrounds: class name -> co-occurring background terms suppressed for that class
            only (paper, camera-ready code).
        global_backgrounds: background terms suppressed for every class (official improved code).
        background_template: background prompt, ``background_template.format(term)``.
        weights: ``alpha, beta, gamma, delta`` of Eq. 13.
        cbs_threshold: hinge of the CBS loss (only similarities above it count), or ``None``.
        cbs_prompt_reduction: ``"mean"`` or ``"sum"`` over a pair's background prompts.
        cbs_reduction: ``"mean"`` or ``"sum"`` of the CBS loss over pairs.
        pair_reduction: ``"mean"`` or ``"sum"`` of the OTM and BTM losses over pairs.
        class_weights: class name -> per-pair weight of OTM and BTM (others weigh 1).
        reg_positive_only: regularise only the maps of present classes.
        masking: ``"pixel"`` or ``"pass_through"`` (see `clims_loss.masking`).
        similarity: how similarities enter the logs, ``"clamp"`` or ``"affine"``
            (see `clims_loss.functional`).
        eps: similarities enter the logs clamped to ``[eps, 1 - eps]``.
        background_scores: optional class name -> one score per term of ``class_backgrounds``
            (written by `clims_loss.mine_backgrounds`; informative only).

    >>> registry = BackgroundPromptRegistry.preset("voc")
    >>> registry.object_prompts()[3], registry.backgrounds_for("boat")
    ('a photo of boat.', ('river', 'sea', 'lake'))
    """

    name: str
    class_names: tuple[str, ...]
    template: str = "a photo of {}."
    class_backgrounds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    global_backgrounds: tuple[str, ...] = ()
    background_template: str = "a photo of {}."
    weights: LossWeights = field(default_factory=LossWeights)
    cbs_threshold: float | None = None
    cbs_prompt_reduction: str = "mean"
    cbs_reduction: str = "sum"
    pair_reduction: str = "mean"
    class_weights: Mapping[str, float] = field(default_factory=dict)
    reg_positive_only: bool = False
    masking: str = "pixel"
    similarity: str = "clamp"
    eps: float = DEFAULT_EPS
    background_scores: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    _presets: ClassVar[dict[str, Callable[[], BackgroundPromptRegistry]]] = {}

    def __post_init__(self) -> None:
        # Check every field's type where it enters (a str where a sequence of str is expected would
        # become its letters), then normalise containers so that equality and JSON round trips are exact.
        check_str("name", self.name)
        for attribute in ("template", "background_template"):
            check_str(attribute, getattr(self, attribute))
        object.__setattr__(self, "class_names", check_strings("class_names", self.class_names))
        object.__setattr__(
            self, "global_backgrounds", check_strings("global_backgrounds", self.global_backgrounds)
        )
        object.__setattr__(
            self,
            "class_backgrounds",
            {
                check_str("class_backgrounds key", k): check_strings(f"class_backgrounds[{k!r}]", v)
                for k, v in check_mapping("class_backgrounds", self.class_backgrounds).items()
            },
        )
        object.__setattr__(
            self,
            "class_weights",
            {
                check_str("class_weights key", k): check_real(f"class_weights[{k!r}]", v, minimum=0.0)
                for k, v in check_mapping("class_weights", self.class_weights).items()
            },
        )
        scores = check_mapping("background_scores", self.background_scores)
        normalised_scores: dict[str, tuple[float, ...]] = {}
        for key, values in scores.items():
            name = f"background_scores[{key!r}]"
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
                raise TypeError(f"expected {name} to be a sequence of numbers, got {type(values).__name__}")
            normalised_scores[check_str("background_scores key", key)] = tuple(
                check_real(f"{name}[{i}]", x) for i, x in enumerate(values)
            )
        object.__setattr__(self, "background_scores", normalised_scores)
        if isinstance(self.weights, Mapping):
            object.__setattr__(self, "weights", LossWeights(**self.weights))
        if not isinstance(self.weights, LossWeights):
            raise TypeError(
                f"expected weights to be a LossWeights or a mapping of its fields, "
                f"got {type(self.weights).__name__}"
            )
        if self.cbs_threshold is not None:
            object.__setattr__(self, "cbs_threshold", check_real("cbs_threshold", self.cbs_threshold))
        check_bool("reg_positive_only", self.reg_positive_only)
        object.__setattr__(self, "eps", check_eps("eps", self.eps))
        self._validate()

    def _validate(self) -> None:
        if not self.class_names:
            raise ValueError("expected at least one class name, got none")
        duplicates = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
        if duplicates:
            raise ValueError(f"expected unique class_names, got duplicates {duplicates}")
        for attribute in ("template", "background_template"):
            text = getattr(self, attribute)
            if text.count("{}") != 1:
                raise ValueError(f"expected {attribute} to contain one '{{}}' placeholder, got {text!r}")
        for mapping_name in ("class_backgrounds", "class_weights"):
            for class_name in getattr(self, mapping_name):
                if class_name not in self.class_names:
                    raise _unknown("class", class_name, self.class_names)
        for class_name, scores in self.background_scores.items():
            terms = self.class_backgrounds.get(class_name, ())
            if len(scores) != len(terms):
                raise ValueError(
                    f"expected background_scores[{class_name!r}] to hold one score per background term "
                    f"({len(terms)}), got {len(scores)}"
                )
        check_choice("cbs_prompt_reduction", self.cbs_prompt_reduction, ("mean", "sum"))
        check_choice("cbs_reduction", self.cbs_reduction, ("mean", "sum"))
        check_choice("pair_reduction", self.pair_reduction, ("mean", "sum"))
        check_choice("masking", self.masking, MASKING_MODES)
        check_choice("similarity", self.similarity, SIMILARITY_MODES)

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def register(
        cls,
        name: str,
        factory: BackgroundPromptRegistry | Callable[[], BackgroundPromptRegistry],
        *,
        overwrite: bool = False,
    ) -> None:
        """Make ``preset(name)`` return ``factory`` (a registry, or a function building one)."""
        check_str("name", name)
        check_bool("overwrite", overwrite)
        if name in cls._presets and not overwrite:
            raise ValueError(f"preset {name!r} is already registered; pass overwrite=True to replace it")
        if isinstance(factory, BackgroundPromptRegistry):
            registry = factory
            cls._presets[name] = lambda: registry
        elif callable(factory):
            cls._presets[name] = factory
        else:
            raise TypeError(
                "expected factory to be a BackgroundPromptRegistry or a callable, "
                f"got {type(factory).__name__}"
            )

    @classmethod
    def available_presets(cls) -> list[str]:
        return sorted(cls._presets)

    @classmethod
    def preset(cls, name: str) -> BackgroundPromptRegistry:
        """A registered preset: ``voc``, ``voc-camera-ready``, ``voc-official``, ``coco`` or your own."""
        check_str("name", name)
        if name not in cls._presets:
            raise _unknown("preset", name, cls._presets)
        registry = cls._presets[name]()
        if not isinstance(registry, BackgroundPromptRegistry):
            raise TypeError(
                f"expected the factory registered as preset {name!r} to return a BackgroundPromptRegistry, "
                f"got {type(registry).__name__} {registry!r:.60}"
            )
        return registry

    # ----------------------------------------------------------------------------- prompts
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_index(self, class_name: str) -> int:
        if class_name not in self.class_names:
            raise _unknown("class", class_name, self.class_names)
        return self.class_names.index(class_name)

    def object_prompts(self) -> list[str]:
        """The ``K`` object prompts, in label order."""
        return [self.template.format(name) for name in self.class_names]

    def backgrounds_for(self, class_name: str) -> tuple[str, ...]:
        """The background terms suppressed for ``class_name``: the global ones, then its own."""
        self.class_index(class_name)
        own = self.class_backgrounds.get(class_name, ())
        return self.global_backgrounds + tuple(t for t in own if t not in self.global_backgrounds)

    def background_terms(self) -> list[str]:
        """The ``L`` distinct background terms: global ones first, then class-specific ones."""
        terms = list(self.global_backgrounds)
        for class_name in self.class_names:
            terms.extend(t for t in self.class_backgrounds.get(class_name, ()) if t not in terms)
        return terms

    def background_prompts(self) -> list[str]:
        """The ``L`` distinct background prompts, in the order of `background_terms`."""
        return [self.background_template.format(term) for term in self.background_terms()]

    def background_mask(self) -> list[list[bool]]:
        """``(K, L)``: whether background prompt ``l`` is suppressed for class ``k``."""
        terms = self.background_terms()
        return [[t in self.backgrounds_for(name) for t in terms] for name in self.class_names]

    def pair_weights(self) -> list[float]:
        """``(K,)`` per-class weight of a pair in OTM and BTM."""
        return [self.class_weights.get(name, 1.0) for name in self.class_names]

    @property
    def uses_cbs(self) -> bool:
        return bool(self.background_terms())

    # ----------------------------------------------------------------------------- editing, JSON
    def replace(self, **changes: Any) -> BackgroundPromptRegistry:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["global_backgrounds"] = list(self.global_backgrounds)
        data["class_backgrounds"] = {k: list(v) for k, v in self.class_backgrounds.items()}
        data["background_scores"] = {k: list(v) for k, v in self.background_scores.items()}
        return data

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The registry as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> BackgroundPromptRegistry:
        """Read a registry from JSON text or from a file path.

        A ``str`` that starts with ``{`` or ``[`` (after white space) is JSON text; any other ``str`` and
        any ``os.PathLike`` is a path. Errors say which of the two was read.

        >>> voc = BackgroundPromptRegistry.preset("voc-official")
        >>> BackgroundPromptRegistry.from_json(voc.to_json()) == voc
        True
        """
        if isinstance(source, str) and source.lstrip()[:1] in ("{", "["):
            text, origin = source, "the JSON text given as source"
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            origin = f"the JSON file {str(path)!r}"
            if not path.is_file():
                what = "a directory" if path.is_dir() else "no existing file"
                raise FileNotFoundError(
                    f"expected source to be JSON text (starting with '{{') or the path of a JSON file, "
                    f"got {str(source)!r:.80}: not JSON text, so read as a path, which names {what}"
                )
            text = path.read_text(encoding="utf-8")
        else:
            raise TypeError(f"expected source to be JSON text or a path, got {type(source).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"expected valid JSON in {origin}, got a syntax error: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"expected {origin} to hold a JSON object of registry fields, got a {type(data).__name__}"
            )
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KeyError(
                f"unknown registry fields {unknown} in {origin}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)


def _voc() -> BackgroundPromptRegistry:
    # The library's default: the paper's prompts and weights (Sec. 3, Sec. 4.3), the camera-ready
    # code's reductions (the paper's numbers come from them), and masking in pixel space.
    return BackgroundPromptRegistry(
        name="voc",
        class_names=_VOC_CLIP_NAMES,
        template="a photo of {}.",
        class_backgrounds={"train": ("railroad", "railway", "tree"), "boat": ("river", "sea", "lake")},
        weights=LossWeights(10.0, 25.0, 29.5, 1.15),
        cbs_prompt_reduction="mean",
        cbs_reduction="sum",
        masking="pixel",
    )


def _voc_camera_ready() -> BackgroundPromptRegistry:
    return BackgroundPromptRegistry(
        name="voc-camera-ready",
        class_names=VOC_CLASSES,
        template="a photo of {}",
        class_backgrounds={
            "boat": ("river", "water", "lake", "sea", "building"),
            "train": ("railroad", "railway", "branches", "tree"),
        },
        background_template="a photo of {}",
        weights=LossWeights(10.0, 25.0, 29.5, 1.15),
        cbs_prompt_reduction="mean",
        cbs_reduction="sum",
        class_weights={"chair": 3.0, "sofa": 3.0, "diningtable": 3.0},
        masking="pass_through",
    )


def _voc_official() -> BackgroundPromptRegistry:
    return BackgroundPromptRegistry(
        name="voc-official",
        class_names=_VOC_OFFICIAL_NAMES,
        template="a photo of {}.",
        global_backgrounds=_VOC_OFFICIAL_BACKGROUNDS,
        background_template="a photo of {}.",
        weights=LossWeights(10.0, 24.0, 1.0, 0.2),
        cbs_threshold=0.26,
        cbs_prompt_reduction="sum",
        cbs_reduction="sum",
        masking="pass_through",
    )


def _coco() -> BackgroundPromptRegistry:
    # The official COCO run is the improved recipe with COCO's classes, backgrounds, weights and hinge.
    return _voc_official().replace(
        name="coco",
        class_names=_COCO_OFFICIAL_NAMES,
        global_backgrounds=_COCO_OFFICIAL_BACKGROUNDS,
        weights=LossWeights(2.0, 14.0, 1.25, 0.2),
        cbs_threshold=0.285,
    )


for _name, _factory in (
    ("voc", _voc),
    ("voc-camera-ready", _voc_camera_ready),
    ("voc-official", _voc_official),
    ("coco", _coco),
):
    BackgroundPromptRegistry.register(_name, _factory)
