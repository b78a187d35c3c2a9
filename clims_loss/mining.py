"""Mining the co-occurring background prompts of each class with CLIP, instead of writing them by hand.

The paper hand-picks backgrounds for two classes (train: railroad, railway, tree; boat: river, sea,
lake) and the official code falls back to one global list. A background worth suppressing for class
``k`` is a term that CLIP sees **more in images of ``k`` than in images without ``k``**, and that is
**not the object itself** (suppressing "ship" for "boat" would fight the object).

For every class ``k`` and vocabulary term ``j``, with ``v_i`` the image embeddings, ``u_j`` the term
prompt's embedding and ``t_k`` the class prompt's embedding (all L2-normalised):

* ``presence[k, j] = mean_{i: y_ik = 1} <v_i, u_j> - mean_{i: y_ik = 0} <v_i, u_j>``: how much more the
  term is seen with the class than without it. A term that appears everywhere scores about 0.
* ``objectness[k, j]``: the z-score over the vocabulary of ``<u_j, t_k>``: how much more the term's
  text resembles the class's text than a typical term's does. Terms above ``max_objectness`` are
  treated as synonyms of the object and never proposed.
* ``score[k, j] = presence[k, j] - objectness_penalty * max(objectness[k, j], 0)``.

The ``top_l`` terms with ``score > margin`` become the class's backgrounds in the returned registry,
with their scores in ``background_scores`` (both readable and editable in its JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clims_loss._validation import (
    binary_check,
    check_floating,
    check_positive_int,
    check_rank,
    check_real,
    check_strings,
    check_tensor,
    check_values,
    finite_check,
)
from clims_loss.clip_loading import as_clip_encoders, clip_input_size
from clims_loss.prompts import BackgroundPromptRegistry

__all__ = ["DEFAULT_BACKGROUND_VOCABULARY", "BackgroundScore", "mine_backgrounds"]

DEFAULT_BACKGROUND_VOCABULARY: tuple[str, ...] = (
    # sky and water
    "sky", "cloud", "sunset", "water", "river", "sea", "ocean", "lake", "pond", "wave", "waterfall",
    "beach", "sand", "shore", "harbor", "dock", "pier", "canal", "swimming pool",
    # ground and vegetation
    "grass", "lawn", "field", "meadow", "pasture", "farm", "hay", "dirt", "mud", "soil", "gravel",
    "rock", "stone", "cliff", "mountain", "hill", "valley", "desert", "snow", "ice", "forest",
    "tree", "trees", "bush", "branches", "leaves", "flowers", "garden", "park", "jungle",
    # transport infrastructure
    "railroad", "railway", "rail track", "train station", "platform", "road", "street", "highway",
    "sidewalk", "crosswalk", "parking lot", "bridge", "tunnel", "runway", "airport", "tarmac",
    "hangar", "race track", "bus stop", "traffic", "fence", "gate", "pole", "sign",
    # buildings and city
    "building", "house", "roof", "wall", "brick wall", "tower", "city", "skyscraper", "church",
    "barn", "stable", "shed", "market", "shop", "balcony", "stairs",
    # indoor stuff
    "floor", "wooden floor", "tile", "carpet", "rug", "ceiling", "window", "curtain", "door",
    "shelf", "cabinet", "counter", "kitchen", "living room", "bedroom", "bathroom", "office",
    "desk", "bed", "pillow", "blanket", "cushion", "lamp", "light", "mirror", "painting",
    "wallpaper", "fireplace", "plate", "food", "tablecloth", "cup", "glass", "vase", "book",
    "keyboard", "screen", "cable", "box", "bag", "basket",
    # people-related context
    "crowd", "clothes", "helmet", "saddle", "leash", "collar", "cage", "nest", "feeder",
    # materials and textures
    "wood", "metal", "concrete", "asphalt", "plastic", "fabric", "paper", "glass window",
)  # fmt: skip


@dataclass(frozen=True)
class BackgroundScore:
    """One vocabulary term's scores for one class (see the module docs)."""

    term: str
    score: float
    presence: float
    objectness: float


def _embed_batches(
    encode: Callable[[Tensor], Tensor], images: Tensor | Iterable[Tensor], batch_size: int, size: int
) -> Tensor:
    if not isinstance(images, (Tensor, Iterable)):
        raise TypeError(
            f"expected images to be a tensor or an iterable of batches, got {type(images).__name__}"
        )
    batches = torch.split(images, batch_size) if isinstance(images, Tensor) else images
    features = []
    for index, batch in enumerate(batches):
        name = "images" if isinstance(images, Tensor) else f"images batch {index}"
        batch = check_tensor(name, batch)
        check_rank(name, batch, 4, "(n, 3, S, S)")
        check_floating(name, batch)
        if size and tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(
                f"expected {name} of shape (n, 3, {size}, {size}), at the CLIP's input size "
                f"(clip_model.visual.image_size) and CLIP-normalised, got {tuple(batch.shape)}"
            )
        check_values([finite_check(name, batch)])  # NaN images would give NaN scores and no backgrounds
        features.append(nn.functional.normalize(encode(batch).float(), dim=-1))
    if not features:
        raise ValueError("expected at least one image, got none")
    return torch.cat(features)


@torch.no_grad()
def mine_backgrounds(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    images: Tensor | Iterable[Tensor],
    labels: Tensor,
    prompts: BackgroundPromptRegistry | str,
    vocabulary: Sequence[str] = DEFAULT_BACKGROUND_VOCABULARY,
    *,
    top_l: int = 3,
    margin: float = 0.0,
    max_objectness: float = 2.0,
    objectness_penalty: float = 0.02,
    batch_size: int = 64,
) -> tuple[BackgroundPromptRegistry, dict[str, list[BackgroundScore]]]:
    """Score every vocabulary term for every class and keep the best as class-specific backgrounds.

    Args:
        clip_model: anything with ``encode_image`` and ``encode_text`` (a frozen CLIP).
        tokenizer: the model's tokenizer.
        images: ``(M, 3, S, S)`` images ready for ``clip_model.encode_image`` (CLIP-normalised, at
            its input size ``S``, which is checked when the model declares ``visual.image_size``), or
            an iterable of such batches in the order of ``labels``. NaN/inf images are an error.
        labels: ``(M, K)`` multi-hot labels of the images.
        prompts: the registry whose classes and templates to use (its backgrounds are replaced).
        vocabulary: candidate background terms (default: ~150 stuff and scene terms).
        top_l: at most this many terms per class.
        margin: a term must score above this.
        max_objectness: terms whose text is this many standard deviations closer to the class's
            text than the vocabulary's average are synonyms of the object and never proposed.
        objectness_penalty: how much positive objectness lowers a term's score.
        batch_size: images per encoder call when ``images`` is a tensor (``>= 1``).

    Returns:
        ``(registry, scores)``: the registry with the mined ``class_backgrounds`` and their
        ``background_scores`` (global backgrounds cleared), and for every class all terms' scores,
        best first.
    """
    registry = BackgroundPromptRegistry.preset(prompts) if isinstance(prompts, str) else prompts
    if not isinstance(registry, BackgroundPromptRegistry):
        raise TypeError(
            "expected prompts to be a BackgroundPromptRegistry or a preset name, "
            f"got {type(prompts).__name__}"
        )
    encoders = as_clip_encoders(clip_model)
    if not callable(tokenizer):
        raise TypeError(f"expected tokenizer to be callable, got {type(tokenizer).__name__}")
    terms = list(dict.fromkeys(check_strings("vocabulary", vocabulary)))
    if not terms:
        raise ValueError("expected a non-empty vocabulary, got none")
    top_l = check_positive_int("top_l", top_l)
    batch_size = check_positive_int("batch_size", batch_size)
    margin = check_real("margin", margin)
    max_objectness = check_real("max_objectness", max_objectness)
    objectness_penalty = check_real("objectness_penalty", objectness_penalty, minimum=0.0)
    labels = check_tensor("labels", labels)
    check_rank("labels", labels, 2, "(M, K)")
    if labels.shape[1] != registry.num_classes:
        raise ValueError(
            f"expected labels of shape (M, K) with K = {registry.num_classes} classes of registry "
            f"{registry.name!r}, got {tuple(labels.shape)}"
        )
    check_values([binary_check("labels", labels), finite_check("labels", labels.float())])

    device = next(iter(clip_model.parameters()), torch.empty(0)).device

    def embed_text(texts: list[str]) -> Tensor:
        return nn.functional.normalize(encoders.encode_text(tokenizer(texts).to(device)).float(), dim=-1)

    # Eval mode for the scores (BatchNorm must use, not overwrite, its running statistics); the
    # caller's mode is restored afterwards.
    was_training = clip_model.training
    clip_model.eval()
    try:
        image_features = _embed_batches(
            lambda x: encoders.encode_image(x.to(device)), images, batch_size, clip_input_size(clip_model, 0)
        )
        term_features = embed_text([registry.background_template.format(t) for t in terms])  # (J, D)
        class_features = embed_text(registry.object_prompts())  # (K, D)
    finally:
        clip_model.train(was_training)
    if image_features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected as many images as labels rows ({labels.shape[0]}), "
            f"got {image_features.shape[0]} images"
        )

    positive = labels.to(device=image_features.device, dtype=image_features.dtype)  # (M, K)
    image_term = image_features @ term_features.T  # (M, J)
    positives, negatives = positive.sum(0), (1 - positive).sum(0)  # (K,)
    mean_with = (positive.T @ image_term) / positives.clamp_min(1).unsqueeze(1)  # (K, J)
    mean_without = ((1 - positive).T @ image_term) / negatives.clamp_min(1).unsqueeze(1)
    presence = mean_with - mean_without

    text_similarity = class_features @ term_features.T  # (K, J)
    spread = text_similarity.std(dim=1, keepdim=True).clamp_min(1e-6) if len(terms) > 1 else 1.0
    objectness = (text_similarity - text_similarity.mean(dim=1, keepdim=True)) / spread
    score = presence - objectness_penalty * objectness.clamp_min(0)

    mined: dict[str, tuple[str, ...]] = {}
    mined_scores: dict[str, tuple[float, ...]] = {}
    all_scores: dict[str, list[BackgroundScore]] = {}
    for k, class_name in enumerate(registry.class_names):
        ranked = sorted(
            (
                BackgroundScore(terms[j], float(score[k, j]), float(presence[k, j]), float(objectness[k, j]))
                for j in range(len(terms))
            ),
            key=lambda s: s.score,
            reverse=True,
        )
        all_scores[class_name] = ranked
        # A class needs images with and without it for the contrast to mean anything.
        if positives[k] == 0 or negatives[k] == 0:
            continue
        kept = [s for s in ranked if s.score > margin and s.objectness <= max_objectness][:top_l]
        if kept:
            mined[class_name] = tuple(s.term for s in kept)
            mined_scores[class_name] = tuple(round(s.score, 6) for s in kept)
    result = registry.replace(
        name=f"{registry.name}-mined",
        class_backgrounds=mined,
        global_backgrounds=(),
        background_scores=mined_scores,
    )
    return result, all_scores
