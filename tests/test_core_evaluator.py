"""CLIPTextDrivenEvaluator: identities against readable per-pair references, freezing, caching, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONTEXT, make_tiny_clip, tiny_tokenizer
from test_core_masking import naive_views

import clims_loss as cl

F64 = torch.float64
TERMS = ("loss", "otm", "btm", "cbs", "reg")


class CountingClip(torch.nn.Module):
    """Wraps a CLIP and counts encoder calls and encoded rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.image_calls: list[int] = []
        self.text_calls = 0
        self.visual = model.visual
        self.context_length = model.context_length
        self.vocab_size = model.vocab_size

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.image_calls.append(images.shape[0])
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.text_calls += 1
        return self.model.encode_text(tokens)


def _batch(classes: int, seed: int = 0, dtype: torch.dtype = F64, batch: int = 3):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 48, 40, generator=generator, dtype=dtype)
    cams = torch.rand(batch, classes, 7, 6, generator=generator, dtype=dtype).requires_grad_()
    labels = torch.zeros(batch, classes, dtype=dtype)
    labels[0, [3, 18 % classes]] = 1.0  # boat and train in VOC: both have background prompts
    labels[1, 0] = 1.0
    labels[2, classes - 1] = 1.0
    return images, cams, labels


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def naive_reference(clip, tokenizer, registry, images, cams, labels, size):  # type: ignore[no-untyped-def]
    """The CLIMS loss one pair at a time, from the registry's fields and the paper's equations."""

    def prob(s: torch.Tensor) -> torch.Tensor:
        s = (s + 1) / 2 if registry.similarity == "affine" else s
        return s.clamp(registry.eps, 1 - registry.eps)

    otm, btm, cbs = [], [], []
    for b in range(labels.shape[0]):
        for k in range(labels.shape[1]):
            if labels[b, k] != 1:
                continue
            one_pair = torch.zeros_like(labels)
            one_pair[b, k] = 1
            fg, bg = naive_views(images, cams, one_pair, size, registry.masking)
            name = registry.class_names[k]
            text = _unit(clip.encode_text(tokenizer([registry.template.format(name)])))[0]
            v_fg, v_bg = _unit(clip.encode_image(fg))[0], _unit(clip.encode_image(bg))[0]
            weight = registry.class_weights.get(name, 1.0)
            otm.append(-weight * torch.log(prob(v_fg @ text)))
            btm.append(-weight * torch.log(1 - prob(v_bg @ text)))
            prompts = [registry.background_template.format(t) for t in registry.backgrounds_for(name)]
            if not prompts:
                cbs.append(torch.zeros((), dtype=images.dtype))
                continue
            sims = _unit(clip.encode_text(tokenizer(prompts))) @ v_fg
            terms = -torch.log(1 - prob(sims))
            if registry.cbs_threshold is not None:
                terms = terms * (sims > registry.cbs_threshold)
            cbs.append(terms.mean() if registry.cbs_prompt_reduction == "mean" else terms.sum())

    def reduce(values: list[torch.Tensor], how: str) -> torch.Tensor:
        total = torch.stack(values).sum()
        return total / len(values) if how == "mean" else total

    parts = {
        "otm": reduce(otm, registry.pair_reduction),
        "btm": reduce(btm, registry.pair_reduction),
        "cbs": reduce(cbs, registry.cbs_reduction),
        "reg": cams.mean(),
    }
    w = registry.weights
    parts["loss"] = w.otm * parts["otm"] + w.btm * parts["btm"] + w.cbs * parts["cbs"] + w.reg * parts["reg"]
    return parts


def _assert_same(out: cl.EvaluatorOutput, reference: dict, cams: torch.Tensor, rtol: float = 1e-7) -> None:  # type: ignore[type-arg]
    for term in TERMS:
        torch.testing.assert_close(getattr(out, term), reference[term], rtol=rtol, atol=1e-9, msg=term)
    (grad_out,) = torch.autograd.grad(out.loss, cams, retain_graph=True)
    (grad_ref,) = torch.autograd.grad(reference["loss"], cams)
    torch.testing.assert_close(grad_out, grad_ref, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("preset", ["voc", "voc-camera-ready", "voc-official", "coco"])
@pytest.mark.parametrize("similarity", ["clamp", "affine"])
def test_fused_evaluator_equals_per_pair_reference(preset: str, similarity: str) -> None:
    clip, tokenizer = make_tiny_clip().double(), tiny_tokenizer()
    registry = cl.BackgroundPromptRegistry.preset(preset).replace(similarity=similarity, cbs_threshold=None)
    if preset in ("voc-official", "coco"):  # keep their hinge: random sims straddle 0 well enough
        registry = registry.replace(cbs_threshold=0.0)
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tokenizer, registry)
    images, cams, labels = _batch(registry.num_classes)
    out = evaluator(images, cams, labels)
    reference = naive_reference(clip, tokenizer, registry, images, cams, labels, evaluator.input_size)
    _assert_same(out, reference, cams)


def official_improved_reference(clip, tokenizer, images, cams, labels):  # type: ignore[no-untyped-def]
    """The official improved training step, written without the library: views are the map and the
    image resized with bilinear ``align_corners=True`` and multiplied (no re-normalisation), one prompt
    "a photo of {name}." per pair, similarities clamped to ``[1e-4, 0.9999]`` inside the logs of OTM and
    BTM (means over pairs), an unclamped CBS over ten global background prompts counted where the
    similarity exceeds 0.26 (sum), REG the mean of all maps, weights 10, 24, 1, 0.2."""
    names = [
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
        "dog", "horse", "motorbike", "player", "potted plant", "sheep", "sofa", "train", "tv monitor",
    ]  # fmt: skip
    backgrounds = ["tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks"]
    size = 32
    cam_224 = F.interpolate(cams, (size, size), mode="bilinear", align_corners=True)
    img_224 = F.interpolate(images, (size, size), mode="bilinear", align_corners=True)
    fg, bg, texts = [], [], []
    for b, k in torch.nonzero(labels == 1).tolist():
        fg.append(cam_224[b, k] * img_224[b])
        bg.append((1 - cam_224[b, k]) * img_224[b])
        texts.append(f"a photo of {names[k]}.")
    fg_views, bg_views = torch.stack(fg), torch.stack(bg)
    text = _unit(clip.encode_text(tokenizer(texts)))
    s_fg = (_unit(clip.encode_image(fg_views)) * text).sum(-1)
    s_bg = (_unit(clip.encode_image(bg_views)) * text).sum(-1)
    otm = -torch.log(s_fg.clamp(1e-4, 0.9999)).mean()
    btm = -torch.log(1 - s_bg.clamp(1e-4, 0.9999)).mean()
    bg_text = _unit(clip.encode_text(tokenizer([f"a photo of {t}." for t in backgrounds])))
    logits = _unit(clip.encode_image(fg_views)) @ bg_text.T
    cbs = -(torch.log(1 - logits) * (logits > 0.26)).sum()
    reg = torch.mean(cams)
    return {"loss": 10 * otm + 24 * btm + 1 * cbs + 0.2 * reg, "otm": otm, "btm": btm, "cbs": cbs, "reg": reg}


def test_official_preset_reproduces_the_official_improved_step() -> None:
    # Seed 2 gives similarities on both sides of the 0.26 hinge and one below the 1e-4 clamp.
    clip, tokenizer = make_tiny_clip(seed=2).double(), tiny_tokenizer()
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tokenizer, "voc-official")
    images, cams, labels = _batch(20, seed=1)
    reference = official_improved_reference(clip, tokenizer, images, cams, labels)
    out = evaluator(images, cams, labels)
    above = out.sim_fg_bgtext > 0.26
    assert above.any() and not above.all() and (out.sim_fg_text < 1e-4).any()
    _assert_same(out, reference, cams)
    assert evaluator.weights == cl.LossWeights(10.0, 24.0, 1.0, 0.2)


def test_module_equals_composition_of_the_functions() -> None:
    clip, tokenizer = make_tiny_clip().double(), tiny_tokenizer()
    registry = cl.BackgroundPromptRegistry.preset("voc")
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tokenizer, registry)
    images, cams, labels = _batch(20)
    out = evaluator(images, cams, labels)

    views = cl.masked_views(images, cams, labels, size=evaluator.input_size)
    features = _unit(clip.encode_image(views.views))
    fg, bg = features[: views.num_pairs], features[views.num_pairs :]
    text = _unit(clip.encode_text(tokenizer(registry.object_prompts())))[views.class_index]
    bg_text = _unit(clip.encode_text(tokenizer(registry.background_prompts())))
    mask = torch.tensor(registry.background_mask())[views.class_index]
    otm = cl.otm_loss((fg * text).sum(-1))
    btm = cl.btm_loss((bg * text).sum(-1))
    cbs = cl.cbs_loss(fg @ bg_text.T, mask, prompt_reduction="mean", reduction="sum")
    reg = cl.reg_loss(cams)
    loss = cl.combine_losses(otm, btm, cbs, reg, registry.weights)
    for term, value in zip(TERMS, (loss, otm, btm, cbs, reg), strict=True):
        torch.testing.assert_close(getattr(out, term), value)


# ----------------------------------------------------------------------------- frozen CLIP
def test_clip_is_frozen_and_outside_the_parent_model() -> None:
    clip = make_tiny_clip()
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tiny_tokenizer())
    parent = torch.nn.ModuleDict({"head": torch.nn.Linear(2, 2), "evaluator": evaluator})
    parent.train()
    assert not clip.training and evaluator.training
    assert all(not p.requires_grad for p in clip.parameters())
    assert [p.shape for p in parent.parameters()] == [p.shape for p in parent["head"].parameters()]
    assert set(parent.state_dict()) == {"head.weight", "head.bias"}
    optimizer = torch.optim.SGD(parent.parameters(), lr=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2


def test_to_moves_clip_and_text_buffers() -> None:
    clip = make_tiny_clip()
    evaluator = cl.CLIPTextDrivenEvaluator(clip, tiny_tokenizer()).to(F64)
    assert next(clip.parameters()).dtype == F64
    assert evaluator.text_embeddings.dtype == F64
    images, cams, labels = _batch(20)
    assert evaluator(images, cams, labels).loss.dtype == F64


def test_text_encoded_once_and_one_image_encoder_call_per_step() -> None:
    counting = CountingClip(make_tiny_clip())
    evaluator = cl.CLIPTextDrivenEvaluator(counting, tiny_tokenizer())
    assert counting.text_calls == 2  # object prompts, background prompts
    images, cams, labels = _batch(20, dtype=torch.float32)
    for _ in range(3):
        evaluator(images, cams, labels).loss.backward()
    assert counting.text_calls == 2
    assert counting.image_calls == [8, 8, 8]  # 2N views of N = 4 pairs, one call per step


def test_zero_weight_terms_do_not_pay_for_their_views() -> None:
    counting = CountingClip(make_tiny_clip())
    weights = cl.LossWeights(otm=1.0, btm=0.0, cbs=1.0, reg=1.0)
    evaluator = cl.CLIPTextDrivenEvaluator(counting, tiny_tokenizer(), weights=weights)
    out = evaluator(*_batch(20, dtype=torch.float32))
    assert counting.image_calls == [4] and out.btm.item() == 0.0


def test_chunked_encoding_equals_one_call() -> None:
    clip = make_tiny_clip().double()
    images, cams, labels = _batch(20)
    whole = cl.CLIPTextDrivenEvaluator(clip, tiny_tokenizer())(images, cams, labels)
    chunked = cl.CLIPTextDrivenEvaluator(clip, tiny_tokenizer(), max_views_per_forward=3)(
        images, cams, labels
    )
    reference = {term: getattr(whole, term) for term in TERMS}
    _assert_same(chunked, reference, cams)


def test_autocast_bfloat16_on_cpu() -> None:
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    images, cams, labels = _batch(20, dtype=torch.float32)
    exact = evaluator(images, cams, labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = evaluator(images, cams, labels)
    out.loss.backward()
    assert out.sim_fg_text.dtype == torch.float32
    assert torch.isfinite(out.loss) and cams.grad is not None and torch.isfinite(cams.grad).all()
    assert out.loss.item() == pytest.approx(exact.item(), rel=0.05)


def test_no_positive_labels_gives_zero_clip_terms_that_backpropagate() -> None:
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    images, cams, labels = _batch(20, dtype=torch.float32)
    out = evaluator(images, cams, torch.zeros_like(labels))
    assert out.otm.item() == out.btm.item() == out.cbs.item() == 0.0
    assert out.loss.item() == pytest.approx(1.15 * cams.mean().item())
    out.loss.backward()
    assert cams.grad is not None and torch.isfinite(cams.grad).all()

    positive_only = cl.BackgroundPromptRegistry.preset("voc").replace(reg_positive_only=True)
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), positive_only)
    cams.grad = None
    out = evaluator(images, cams, torch.zeros_like(labels))
    out.loss.backward()
    assert out.loss.item() == 0.0 and cams.grad is not None and (cams.grad == 0).all()


def test_output_reports_pairs_and_similarities() -> None:
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    out = evaluator(*_batch(20, dtype=torch.float32))
    assert out.batch_index.tolist() == [0, 0, 1, 2] and out.class_index.tolist() == [3, 18, 0, 19]
    assert out.sim_fg_text.shape == (4,) and out.sim_fg_bgtext.shape == (4, 6)
    assert set(out.as_dict()) == set(TERMS)


# ----------------------------------------------------------------------------- errors
def _tokenizer_77() -> Callable[[list[str]], torch.Tensor]:
    return open_clip.tokenizer.SimpleTokenizer(context_length=77)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: cl.CLIPTextDrivenEvaluator(make_tiny_clip(), _tokenizer_77()),
            r"tokenizer/model mismatch.*16.*got 77",
        ),
        (
            lambda: cl.CLIPTextDrivenEvaluator(torch.nn.Linear(2, 2), tiny_tokenizer()),
            r"callable encode_image",
        ),
        (
            lambda: cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), "vocc"),
            r"unknown preset 'vocc'.*voc-official",
        ),
        (
            lambda: cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), 3),
            r"BackgroundPromptRegistry or a preset",
        ),
        (
            lambda: cl.CLIPTextDrivenEvaluator(
                make_tiny_clip(),
                tiny_tokenizer(),
                cl.BackgroundPromptRegistry(name="bare", class_names=("a", "b")),
            ),
            r"background prompts in registry 'bare' because the CBS weight is 29.5",
        ),
        (
            lambda: cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), max_views_per_forward=0),
            r"max_views",
        ),
        (
            lambda: cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), weights=(1, 2, 3, 4)),
            r"LossWeights",
        ),
    ],
)
def test_construction_errors(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError, KeyError), match=message):
        build()


def test_forward_errors() -> None:
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer())
    images, cams, labels = _batch(20, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"K = 20 classes of registry 'voc', got \(3, 21, 7, 6\)"):
        evaluator(images, torch.rand(3, 21, 7, 6), torch.zeros(3, 21))
    with pytest.raises(ValueError, match=r"cams to lie in \[0, 1\]"):
        evaluator(images, cams.detach() * 3, labels)
    with pytest.raises(ValueError, match=r"images on the evaluator's device cpu, got meta"):
        evaluator(images.to("meta"), cams.to("meta"), labels.to("meta"))


# ----------------------------------------------------------------------------- loading through open_clip
def test_from_pretrained_loads_a_local_checkpoint(tiny_config_name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = open_clip.create_model(tiny_config_name)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    evaluator = cl.CLIPTextDrivenEvaluator.from_pretrained(tiny_config_name, pretrained=path, prompts="voc")
    for mine, theirs in zip(
        evaluator.clip_model.state_dict().values(), source.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(mine, theirs)
    assert evaluator.input_size == 32 and evaluator.text_embeddings.shape == (20, 16)
    model, _ = cl.load_open_clip(tiny_config_name, path)
    assert not model.training  # open_clip builds in training mode; the loader hands CLIP over frozen-ready
    out = evaluator(*_batch(20, dtype=torch.float32))
    assert torch.isfinite(out.loss)


def test_openai_tag_selects_quick_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_create_model(name: str, **kwargs: object) -> torch.nn.Module:
        seen.update(kwargs, name=name)
        return make_tiny_clip()

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: tiny_tokenizer())
    cl.load_open_clip("ViT-B-32", "openai")
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"
    cl.load_open_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert seen["force_quick_gelu"] is False
    cl.load_open_clip("ViT-B-32", None, quick_gelu=True)
    assert seen["force_quick_gelu"] is True


def test_unknown_tag_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"local file or one of open_clip's tags for 'ViT-B-32' \(.*openai"):
        cl.load_open_clip("ViT-B-32", "no-such-tag")


def test_quick_gelu_really_changes_the_activation() -> None:
    gelu, quick = make_tiny_clip(quick_gelu=False), make_tiny_clip(quick_gelu=True)
    tokens = tiny_tokenizer()(["a photo of a boat."])
    assert not torch.allclose(gelu.encode_text(tokens), quick.encode_text(tokens))
    assert tokens.shape[1] == TINY_CONTEXT
    assert math.isfinite(float(quick.encode_text(tokens).sum().detach()))
