"""Every setting is checked where it enters, and the errors that used to come from deep inside torch or
open_clip are clear: each case names the argument, what was expected and what came."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import make_tiny_clip, tiny_tokenizer

import clims_loss as cl
from clims_loss import BackgroundPromptRegistry, LossWeights

NAN, INF = float("nan"), float("inf")
Call = Callable[[], object]


def _evaluator(**kwargs: object) -> cl.CLIPTextDrivenEvaluator:
    return cl.CLIPTextDrivenEvaluator(make_tiny_clip(), tiny_tokenizer(), **kwargs)  # type: ignore[arg-type]


def _raises(call: Call, error: type[Exception] | tuple[type[Exception], ...], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------- LossWeights
@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (dict(otm=NAN), ValueError, r"expected LossWeights.otm to be finite and >= 0, got nan"),
        (dict(btm=INF), ValueError, r"expected LossWeights.btm to be finite and >= 0, got inf"),
        (dict(cbs=-1.0), ValueError, r"expected LossWeights.cbs >= 0, got -1.0"),
        (dict(reg="1.15"), TypeError, r"expected LossWeights.reg to be a real number, got str '1.15'"),
        (dict(otm=True), TypeError, r"expected LossWeights.otm to be a real number, got bool True"),
        (dict(otm=None), TypeError, r"expected LossWeights.otm to be a real number, got NoneType None"),
    ],
)
def test_loss_weights_must_be_finite_and_non_negative(fields: dict, error: type, message: str) -> None:  # type: ignore[type-arg]
    _raises(lambda: LossWeights(**fields), error, message)


def test_loss_weights_are_stored_as_floats() -> None:
    assert LossWeights(1, 2, 3, 4) == LossWeights(1.0, 2.0, 3.0, 4.0)
    assert all(type(v) is float for v in LossWeights(1, 2, 3, 4).as_dict().values())
    assert LossWeights(otm=0.0).otm == 0.0  # zero switches a term off and stays allowed


# ----------------------------------------------------------------------------- evaluator settings
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(image_std=(0.229, 0.0, 0.225)), ValueError, r"expected image_std > 0 in every channel, got "),
        (dict(clip_std=(0.27, -0.26, 0.28)), ValueError, r"expected clip_std > 0 in every channel"),
        (dict(image_mean=(0.5, NAN, 0.4)), ValueError, r"expected image_mean\[1\] to be finite, got nan"),
        (dict(clip_mean=(0.5, 0.5)), ValueError, r"expected clip_mean to hold 3 per-channel values, got 2"),
        (dict(image_mean="rgb"), TypeError, r"expected image_mean to hold 3 per-channel values, got str"),
        (dict(input_size=224), ValueError, r"expected input_size to be the CLIP's input side 32 .* got 224"),
        (dict(input_size=0), ValueError, r"expected input_size to be a positive int, got 0"),
        (dict(input_size=32.0), TypeError, r"expected input_size to be a positive int, got float 32.0"),
        (dict(max_views_per_forward=0), ValueError, r"max_views_per_forward to be a positive int, got 0"),
        (dict(validate="yes"), TypeError, r"expected validate to be a bool, got str 'yes'"),
        (
            dict(prompts=BackgroundPromptRegistry.preset("voc").replace(eps=1e-9)),
            ValueError,
            r"expected prompts.eps >= 1.19e-07 \(torch.finfo\(torch.float32\).eps\).* got 1e-09",
        ),
    ],
)
def test_evaluator_settings(kwargs: dict, error: type, message: str) -> None:  # type: ignore[type-arg]
    _raises(lambda: _evaluator(**kwargs), error, message)


def test_tokenizer_none_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"expected tokenizer to be callable .* got NoneType"):
        cl.CLIPTextDrivenEvaluator(make_tiny_clip(), None)  # type: ignore[arg-type]


def test_eps_that_needs_float64_works_with_a_float64_clip() -> None:
    registry = BackgroundPromptRegistry.preset("voc").replace(eps=1e-12)
    evaluator = cl.CLIPTextDrivenEvaluator(make_tiny_clip().double(), tiny_tokenizer(), registry)
    assert evaluator.text_embeddings.dtype == torch.float64


# ----------------------------------------------------------------------------- loss settings
SIMS = torch.tensor([0.2, 0.5])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: cl.cbs_loss(SIMS.view(1, 2), threshold=NAN), ValueError, r"threshold to be finite, got nan"),
        (lambda: cl.cbs_loss(SIMS.view(1, 2), threshold="0.26"), TypeError, r"threshold to be a real number"),
        (
            lambda: cl.cbs_loss(SIMS.view(1, 2), torch.full((1, 2), 0.5)),
            TypeError,
            r"expected prompt_mask to have dtype torch.bool .* got torch.float32",
        ),
        (
            lambda: cl.otm_loss(SIMS, eps=1e-8),
            ValueError,
            r"expected eps >= 1.19e-07 \(torch.finfo\(torch.float32\).eps\) .* got 1e-08",
        ),
        (
            lambda: cl.btm_loss(SIMS.half(), eps=5e-8),
            ValueError,
            r"expected eps >= 1.19e-07 .* clamped in torch.float32",  # half inputs are clamped in float32
        ),
        (lambda: cl.otm_loss(SIMS, eps=NAN), ValueError, r"expected eps to be finite, got nan"),
        (lambda: cl.otm_loss(SIMS, eps="1e-4"), TypeError, r"expected eps to be a real number, got str"),
        (lambda: cl.otm_loss(SIMS, eps=0.5), ValueError, r"expected eps in \(0, 0.5\), got 0.5"),
        (
            lambda: cl.similarity_to_probability(SIMS.double(), eps=1e-17),
            ValueError,
            r"expected eps >= 2.22e-16 \(torch.finfo\(torch.float64\).eps\)",
        ),
        (lambda: cl.otm_loss(SIMS, validate=1), TypeError, r"expected validate to be a bool, got int 1"),
        (
            lambda: cl.reg_loss(torch.zeros(2, 3, 0, 0)),
            ValueError,
            r"expected cams of shape \(B, K, h, w\) with both spatial sides >= 1, got \(2, 3, 0, 0\)",
        ),
        (
            lambda: cl.reg_loss(torch.zeros(1, 2, 2, 2), positive_only="no"),
            TypeError,
            r"positive_only to be a bool",
        ),
        (
            lambda: cl.reg_loss(torch.zeros(1, 2, 2, 2), reduction="avg"),
            ValueError,
            r"reduction to be one of",
        ),
    ],
)
def test_loss_settings(call: Call, error: type, message: str) -> None:
    _raises(call, error, message)


def test_eps_close_to_the_float32_limit_gives_finite_losses() -> None:
    eps = float(torch.finfo(torch.float32).eps)
    sims = torch.tensor([-1.0, 0.0, 1.0, 1.0 - 1e-9], requires_grad=True)
    for loss in (cl.otm_loss, cl.btm_loss):
        value = loss(sims, eps=eps, reduction="sum")
        (grad,) = torch.autograd.grad(value, sims)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- registry settings
@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (
            dict(class_names="cat"),
            TypeError,
            r"expected class_names to be a sequence of str \(e.g. a tuple\), got a single str 'cat'",
        ),
        (dict(class_names=("a", 3)), TypeError, r"expected class_names\[1\] to be a str, got int 3"),
        (dict(global_backgrounds="sky"), TypeError, r"expected global_backgrounds to be a sequence of str"),
        (
            dict(class_backgrounds={"a": "grass"}),
            TypeError,
            r"expected class_backgrounds\['a'\] to be a sequence of str .* got a single str 'grass'",
        ),
        (dict(class_weights={"a": -3.0}), ValueError, r"expected class_weights\['a'\] >= 0, got -3.0"),
        (dict(class_weights={"a": NAN}), ValueError, r"expected class_weights\['a'\] to be finite"),
        (dict(cbs_threshold=NAN), ValueError, r"expected cbs_threshold to be finite, got nan"),
        (dict(eps=NAN), ValueError, r"expected eps to be finite, got nan"),
        (dict(weights=(1, 2, 3, 4)), TypeError, r"expected weights to be a LossWeights or a mapping"),
        (dict(weights={"otm": -1.0}), ValueError, r"expected LossWeights.otm >= 0, got -1.0"),
        (dict(template=None), TypeError, r"expected template to be a str, got NoneType"),
        (dict(name=3), TypeError, r"expected name to be a str, got int 3"),
        (dict(reg_positive_only="false"), TypeError, r"expected reg_positive_only to be a bool"),
        (
            dict(class_backgrounds={"a": ("grass",)}, background_scores={"a": ("high",)}),
            TypeError,
            r"expected background_scores\['a'\]\[0\] to be a real number, got str 'high'",
        ),
    ],
)
def test_registry_fields(fields: dict, error: type, message: str) -> None:  # type: ignore[type-arg]
    arguments: dict[str, object] = dict(name="x", class_names=("a", "b"))
    arguments.update(fields)
    _raises(lambda: BackgroundPromptRegistry(**arguments), error, message)  # type: ignore[arg-type]


def test_factory_returning_something_else_is_refused_by_preset() -> None:
    BackgroundPromptRegistry.register("test-bad-factory", lambda: "voc", overwrite=True)  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(
            TypeError,
            match=r"expected the factory registered as preset 'test-bad-factory' to return a "
            r"BackgroundPromptRegistry, got str 'voc'",
        ):
            BackgroundPromptRegistry.preset("test-bad-factory")
    finally:
        BackgroundPromptRegistry._presets.pop("test-bad-factory")
    with pytest.raises(TypeError, match=r"expected factory to be a BackgroundPromptRegistry or a callable"):
        BackgroundPromptRegistry.register("test-bad", 3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- from_json
def test_from_json_says_whether_it_read_text_or_a_path(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"expected the JSON text given as source to hold a JSON object .* list"
    ):
        BackgroundPromptRegistry.from_json("[1, 2]")
    with pytest.raises(ValueError, match=r"expected valid JSON in the JSON text given as source"):
        BackgroundPromptRegistry.from_json('{"name": ')
    with pytest.raises(
        FileNotFoundError,
        match=r"JSON text .* or the path of a JSON file, got 'voc.json': not JSON text, so read as a path, "
        r"which names no existing file",
    ):
        BackgroundPromptRegistry.from_json("voc.json")
    path = tmp_path / "registry.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"expected the JSON file '.*registry.json' to hold a JSON object"):
        BackgroundPromptRegistry.from_json(path)
    path.write_text('{"name": "x", "class_names": ["a"], "colour": 1}')
    with pytest.raises(KeyError, match=r"unknown registry fields \['colour'\] in the JSON file"):
        BackgroundPromptRegistry.from_json(str(path))
    with pytest.raises(TypeError, match=r"expected source to be JSON text or a path, got int"):
        BackgroundPromptRegistry.from_json(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- masked_views
def _views_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return torch.zeros(2, 3, 8, 8), torch.rand(2, 2, 4, 4), labels


@pytest.mark.parametrize(
    ("pairs", "error", "message"),
    [
        (
            (torch.tensor([0, 5]), torch.tensor([0, 1])),
            ValueError,
            r"expected pairs\[0\] \(batch_index\) to hold indices in \[0, 2\), got indices in \[0, 5\]",
        ),
        (
            (torch.tensor([0, 1]), torch.tensor([-1, 1])),
            ValueError,
            r"expected pairs\[1\] \(class_index\) to hold indices in \[0, 2\), got indices in \[-1, 1\]",
        ),
        (
            (torch.tensor([0, 1]), torch.tensor([0])),
            ValueError,
            r"expected pairs of equal length \(N,\), got batch_index \(2,\) and class_index \(1,\)",
        ),
        (
            (torch.tensor([0.0, 1.0]), torch.tensor([0, 1])),
            TypeError,
            r"expected pairs\[0\] to be a 1-d int64 tensor of shape \(N,\), got torch.float32",
        ),
        (
            [torch.tensor([0]), torch.tensor([0])],
            TypeError,
            r"expected pairs to be a \(batch_index, class_index\)",
        ),
    ],
)
def test_masked_views_out_of_range_pairs(pairs: object, error: type, message: str) -> None:
    images, cams, labels = _views_inputs()
    _raises(lambda: cl.masked_views(images, cams, labels, size=8, pairs=pairs), error, message)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(images=torch.zeros(2, 3, 0, 0)),
            r"images of shape \(B, 3, H, W\) with both spatial sides >= 1",
        ),
        (dict(cams=torch.zeros(2, 2, 4, 0)), r"cams of shape \(B, K, h, w\) with both spatial sides >= 1"),
        (dict(image_std=(1.0, 0.0, 1.0)), r"image_std > 0 in every channel"),
        (dict(clip_mean=(0.5, INF, 0.5)), r"clip_mean\[1\] to be finite"),
        (dict(image_std=torch.tensor([1.0, -1.0, 1.0])), r"expected image_std > 0 in every entry"),
        (dict(size=True), r"expected size to be a positive int, got bool True"),
    ],
)
def test_masked_views_zero_sized_inputs_and_channel_settings(change: dict, message: str) -> None:  # type: ignore[type-arg]
    images, cams, labels = _views_inputs()
    arguments: dict[str, object] = dict(images=images, cams=cams, labels=labels, size=8)
    arguments.update(change)
    _raises(lambda: cl.masked_views(**arguments), (ValueError, TypeError), message)  # type: ignore[arg-type]


def test_evaluator_zero_sized_inputs() -> None:
    evaluator = _evaluator()
    labels = torch.zeros(2, 20)
    labels[0, 3] = 1.0
    with pytest.raises(
        ValueError, match=r"images of shape \(B, 3, H, W\) with both spatial sides >= 1, got \(2, 3, 0, 0\)"
    ):
        evaluator(torch.zeros(2, 3, 0, 0), torch.rand(2, 20, 4, 4), labels)
    with pytest.raises(
        ValueError, match=r"cams of shape \(B, K, h, w\) with both spatial sides >= 1, got \(2, 20, 0, 0\)"
    ):
        evaluator(torch.zeros(2, 3, 8, 8), torch.rand(2, 20, 0, 0), labels)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture
def checkpoints(tiny_config_name: str, tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save(open_clip.create_model(tiny_config_name).state_dict(), good)
    data = good.read_bytes()
    files = {
        "empty": b"",
        "garbage": b"these are not weights" * 10,
        "truncated": data[: len(data) // 2],
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["wrong_model"] = tmp_path / "wrong_model.pt"
    torch.save({"weight": torch.zeros(2)}, paths["wrong_model"])
    paths["objects"] = tmp_path / "objects.pt"
    torch.save({"config": Path("not a tensor")}, paths["objects"])
    return paths


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "empty",
            r"expected pretrained to be a CLIP checkpoint file, got an empty file \(0 bytes\): .*empty.pt",
        ),
        ("garbage", r"could not load the CLIP checkpoint .*garbage.pt: torch.load"),
        ("truncated", r"could not load the CLIP checkpoint .*truncated.pt: it is truncated or corrupt"),
        (
            "wrong_model",
            r"checkpoint .*wrong_model.pt: its tensors do not fit the open_clip model 'clims-test-tiny'",
        ),
        (
            "objects",
            r"checkpoint .*objects.pt: torch.load\(weights_only=True\) refuses it.*Unsupported global",
        ),
    ],
)
def test_corrupt_checkpoints_name_the_file_and_the_problem(
    tiny_config_name: str, checkpoints: dict[str, Path], name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        cl.load_open_clip(tiny_config_name, checkpoints[name])
    assert "weights_only=False will likely succeed" not in str(caught.value)


# ----------------------------------------------------------------------------- mine_backgrounds
def _mining_inputs() -> tuple[torch.Tensor, torch.Tensor, BackgroundPromptRegistry]:
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    return images, labels, BackgroundPromptRegistry(name="t", class_names=("boat", "cow"))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(batch_size=0), ValueError, r"expected batch_size to be a positive int, got 0"),
        (dict(top_l=0), ValueError, r"expected top_l to be a positive int, got 0"),
        (dict(margin=NAN), ValueError, r"expected margin to be finite, got nan"),
        (dict(objectness_penalty=-1.0), ValueError, r"expected objectness_penalty >= 0, got -1.0"),
        (
            dict(vocabulary="sky"),
            TypeError,
            r"expected vocabulary to be a sequence of str .* single str 'sky'",
        ),
        (
            dict(images=torch.randn(4, 3, 48, 48)),
            ValueError,
            r"expected images of shape \(n, 3, 32, 32\), at the CLIP's input size .* got \(4, 3, 48, 48\)",
        ),
        (
            dict(images=[torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]),
            ValueError,
            r"expected images batch 1 of shape \(n, 3, 32, 32\)",
        ),
        (
            dict(images=torch.full((4, 3, 32, 32), NAN)),
            ValueError,
            r"expected images to be finite, got 12288 NaN/inf values",
        ),
        (dict(prompts=3), TypeError, r"expected prompts to be a BackgroundPromptRegistry or a preset name"),
    ],
)
def test_mine_backgrounds_settings(change: dict, error: type, message: str) -> None:  # type: ignore[type-arg]
    images, labels, registry = _mining_inputs()
    arguments: dict[str, object] = dict(
        clip_model=make_tiny_clip(),
        tokenizer=tiny_tokenizer(),
        images=images,
        labels=labels,
        prompts=registry,
        vocabulary=["water", "sky"],
    )
    arguments.update(change)
    _raises(lambda: cl.mine_backgrounds(**arguments), error, message)  # type: ignore[arg-type]


def test_json_config_of_the_tiny_clip_is_what_the_fixtures_use(tiny_config_name: str) -> None:
    # The checkpoint tests above build the model by name; make sure that name is the tiny one.
    assert json.loads(json.dumps(open_clip.get_model_config(tiny_config_name)))["embed_dim"] == 16
