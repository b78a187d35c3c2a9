"""DeepLabV2 initialisation from files in deeplab-pytorch's layout (offline: the files are faked here).

The fake files are written *from* a randomly initialised DeepLabV2-ResNet-101 of this pipeline, renamed to
deeplab-pytorch's keys and converted to its input convention by the rules below (written from
deeplab-pytorch's model and data code, independently of the loader), so a correct loader must give every
backbone tensor back.

deeplab-pytorch's layout: ``layer1`` is the stem (``conv1`` = conv + bn, a max-pool), ``layer2``-``layer5``
are the four ResNet stages of ``block1``..``blockN`` bottlenecks, each ``reduce`` (1x1), ``conv3x3``,
``increase`` (1x1) and, in ``block1``, ``shortcut`` (older versions: ``proj``), every one a ``conv`` + ``bn``
pair; ``aspp.c0``..``aspp.c3`` (older: ``aspp.stages.c0``..) are the ASPP convs; an MSC wrapper adds
``base.`` (older: ``scale.``). Input: BGR pixels 0-255 minus (104.008, 116.669, 122.675).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clims_pipeline.deeplab import DeepLabV2
from clims_pipeline.segmentation_init import load_segmentation_init

CAFFE_MEAN_BGR = torch.tensor([104.008, 116.669, 122.675], dtype=torch.float64)
TORCHVISION_MEAN_RGB = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
TORCHVISION_STD_RGB = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
BRANCHES = {"1": "reduce", "2": "conv3x3", "3": "increase"}  # torchvision conv1/bn1, conv2/bn2, conv3/bn3


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """New values for every floating tensor (BatchNorm statistics and affine parameters included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values * 0.1)
    return model


@pytest.fixture(scope="module")
def source() -> DeepLabV2:
    """One ResNet-101 DeepLabV2 (built once: ~2 s) whose tensors the fake files carry."""
    torch.manual_seed(0)
    return randomise(DeepLabV2(21, backbone="resnet101", weights="none"), seed=1).eval()


def fresh_model(source: DeepLabV2, seed: int = 2) -> DeepLabV2:
    """A model of the same architecture with other values everywhere (cheaper than building one)."""
    return randomise(copy.deepcopy(source), seed)


def caffe_stem(weight: torch.Tensor, running_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our conv1 (RGB, ImageNet-normalised input) and bn1 running mean -> the same first layer for Caffe's
    input ``x_bgr * 255 - mean_bgr``: input channels reversed and divided by ``255 * std``, and the conv's
    response to the constant difference of the means moved into the running mean."""
    rgb = weight.double() / (255.0 * TORCHVISION_STD_RGB)[None, :, None, None]
    bgr = rgb.flip(1)
    # Our zero input is the ImageNet mean pixel, i.e. Caffe input 255 * mean - caffe_mean (per channel).
    constant = (255.0 * TORCHVISION_MEAN_RGB.flip(0) - CAFFE_MEAN_BGR)[None, :, None, None].expand(1, 3, 7, 7)
    response = F.conv2d(constant, bgr)[0, :, 0, 0]
    return bgr.float(), (running_mean.double() + response).float()


def deeplab_pytorch_state(
    model: DeepLabV2, prefix: str = "base.", old_names: bool = False, aspp: bool = True
) -> dict[str, torch.Tensor]:
    """``model``'s tensors under deeplab-pytorch's keys and in its input convention."""
    shortcut = "proj" if old_names else "shortcut"
    aspp_prefix = "aspp.stages." if old_names else "aspp."
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "aspp":
            if aspp:
                state[f"{aspp_prefix}c{parts[2]}.{parts[3]}"] = value.clone()
            continue
        position = int(parts[1])
        if position in (0, 1):
            state[f"layer1.conv1.{'conv' if position == 0 else 'bn'}.{parts[2]}"] = value.clone()
            continue
        # backbone.{4..7} are torchvision's layer1..layer4, deeplab-pytorch's layer2..layer5.
        stage, block, module, name = position - 2, int(parts[2]) + 1, parts[3], parts[-1]
        if module == "downsample":
            branch, part = shortcut, "conv" if parts[4] == "0" else "bn"
        else:
            branch, part = BRANCHES[module[-1]], "conv" if module.startswith("conv") else "bn"
        state[f"layer{stage}.block{block}.{branch}.{part}.{name}"] = value.clone()
    weight, running_mean = caffe_stem(
        state["layer1.conv1.conv.weight"], state["layer1.conv1.bn.running_mean"]
    )
    state["layer1.conv1.conv.weight"], state["layer1.conv1.bn.running_mean"] = weight, running_mean
    return {prefix + key: value for key, value in state.items()}


def assert_backbone_equal(loaded: DeepLabV2, source: DeepLabV2) -> None:
    ours, theirs = loaded.state_dict(), source.state_dict()
    for key, value in theirs.items():
        if not key.startswith("backbone."):
            continue
        if key in ("backbone.0.weight", "backbone.1.running_mean"):  # converted twice: float rounding
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=f"{key} differs")
        else:
            assert torch.equal(ours[key], value), f"{key} differs"


def test_fake_file_matches_deeplab_pytorch_key_names(source: DeepLabV2) -> None:
    state = deeplab_pytorch_state(source)
    # ResNet-101: 3, 4, 23, 3 bottlenecks; 7x7 stem; four 21-class ASPP branches.
    assert state["base.layer1.conv1.conv.weight"].shape == (64, 3, 7, 7)
    assert state["base.layer2.block1.shortcut.conv.weight"].shape == (256, 64, 1, 1)
    assert state["base.layer3.block1.reduce.conv.weight"].shape == (128, 256, 1, 1)
    assert state["base.layer4.block23.conv3x3.bn.running_var"].shape == (256,)
    assert state["base.layer5.block3.increase.conv.weight"].shape == (2048, 512, 1, 1)
    assert state["base.aspp.c3.weight"].shape == (21, 2048, 3, 3)
    assert "base.layer4.block24.reduce.conv.weight" not in state
    assert not any(".downsample" in key or "backbone" in key for key in state)


def test_caffe_stem_on_caffe_input_equals_our_stem_on_normalised_input(source: DeepLabV2) -> None:
    """The fake file's first layer, fed deeplab-pytorch's input, computes what ours computes (interior)."""
    state = deeplab_pytorch_state(source)
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 40, 48, dtype=torch.float64) * 255  # RGB 0-255
    ours_in = (pixels / 255 - TORCHVISION_MEAN_RGB[None, :, None, None]) / TORCHVISION_STD_RGB[
        None, :, None, None
    ]
    caffe_in = pixels.flip(1) - CAFFE_MEAN_BGR[None, :, None, None]
    bn = {name: state[f"base.layer1.conv1.bn.{name}"].double() for name in ("weight", "bias", "running_mean")}
    caffe_out = F.batch_norm(
        F.conv2d(caffe_in, state["base.layer1.conv1.conv.weight"].double(), stride=2, padding=3),
        bn["running_mean"],
        state["base.layer1.conv1.bn.running_var"].double(),
        bn["weight"],
        bn["bias"],
        eps=1e-5,
    )
    stem = copy.deepcopy(nn.Sequential(source.backbone[0], source.backbone[1])).double().eval()
    with torch.no_grad():
        ours_out = stem(ours_in)
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # outside the zero-padded border
    # The file stores float32: agreement to its rounding (a one-grey-level mean error would be ~1e-2 off).
    torch.testing.assert_close(ours_out[interior], caffe_out[interior], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("prefix", "old_names"),
    [("base.", False), ("module.scale.", True)],
    ids=["deeplabv2-msc", "dataparallel-older-names"],
)
def test_deeplab_pytorch_checkpoint_loads_backbone_and_head(
    source: DeepLabV2, tmp_path: Path, prefix: str, old_names: bool
) -> None:
    """e.g. deeplabv2_resnet101_msc-vocaug-20000.pth: 21 classes, so the ASPP head loads too."""
    path = tmp_path / "deeplabv2_resnet101_msc-vocaug-20000.pth"
    torch.save(deeplab_pytorch_state(source, prefix, old_names), path)
    model = fresh_model(source)
    report = load_segmentation_init(model, path)
    assert_backbone_equal(model, source)
    for key, value in source.state_dict().items():
        if key.startswith("aspp."):
            assert torch.equal(model.state_dict()[key], value), key
    assert report.layout == "deeplab-pytorch"
    assert report.loaded == len(source.state_dict())
    assert not report.skipped
    assert any("torchvision's ResNet-101 layout" in note for note in report.notes)
    assert any("BGR" in note for note in report.notes)


def test_cocostuff_head_is_skipped_and_ours_kept(source: DeepLabV2, tmp_path: Path) -> None:
    """deeplabv2_resnet101_msc-cocostuff164k-100000.pth: a 182-class ASPP; the backbone loads, our 21-class
    head stays at its initialisation."""
    state = deeplab_pytorch_state(source, aspp=False)
    for index in range(4):
        state[f"base.aspp.c{index}.weight"] = torch.randn(182, 2048, 3, 3) * 0.01
        state[f"base.aspp.c{index}.bias"] = torch.zeros(182)
    path = tmp_path / "deeplabv2_resnet101_msc-cocostuff164k-100000.pth"
    torch.save(state, path)
    model = fresh_model(source)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("aspp.")}
    report = load_segmentation_init(model, path)
    assert_backbone_equal(model, source)
    for key, value in head_before.items():
        assert torch.equal(model.state_dict()[key], value), f"{key} changed"
    backbone_tensors = sum(key.startswith("backbone.") for key in source.state_dict())
    assert report.loaded == backbone_tensors
    (reason,) = [r for r in report.skipped if "182-class" in r]
    assert len(report.skipped[reason]) == 8 and "21 classes" in reason
    assert "182-class" in report.summary() and f"{backbone_tensors} tensors loaded" in report.summary()


def test_coco_init_file_without_prefix_or_aspp(source: DeepLabV2, tmp_path: Path) -> None:
    """deeplabv1_resnet101-coco.pth (converted from the DeepLab authors' init.caffemodel): no prefix, no ASPP,
    a 91-class 1x1 ``fc`` that DeepLabV2 does not use."""
    state = deeplab_pytorch_state(source, prefix="", aspp=False)
    state["fc.weight"], state["fc.bias"] = torch.randn(91, 2048, 1, 1), torch.zeros(91)
    path = tmp_path / "deeplabv1_resnet101-coco.pth"
    torch.save(state, path)
    model = fresh_model(source)
    report = load_segmentation_init(model, path)
    assert_backbone_equal(model, source)
    assert report.skipped["classifier tensors DeepLabV2 does not use"] == ["fc.bias", "fc.weight"]
    assert len(report.skipped["ASPP tensors kept at their initialisation"]) == 8


def test_incomplete_or_foreign_files_raise_naming_the_keys(source: DeepLabV2, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    torch.save({"encoder.stem.weight": torch.zeros(3), "head.proj.bias": torch.zeros(2)}, garbage)
    with pytest.raises(ValueError, match=r"not a DeepLabV2 / ResNet-101 state dict.*encoder\.stem\.weight"):
        load_segmentation_init(DeepLabV2(21, backbone="tiny", weights="none"), garbage)

    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch state dict file"):
        load_segmentation_init(DeepLabV2(21, backbone="tiny", weights="none"), not_torch)

    truncated = deeplab_pytorch_state(source)
    truncated = {k: v for k, v in truncated.items() if not k.startswith("base.layer5.")}
    truncated["base.layer6.block1.extra.conv.weight"] = torch.zeros(1)
    path = tmp_path / "truncated.pth"
    torch.save(truncated, path)
    with pytest.raises(ValueError) as error:
        load_segmentation_init(fresh_model(source), path)
    message = str(error.value)
    assert "deeplab-pytorch layout" in message and "backbone.7.0.conv1.weight" in message
    assert "layer6.block1.extra.conv.weight" in message  # the file's unmatched key

    # A ResNet-101 file does not fit the tiny backbone: the error names the keys and shapes.
    with pytest.raises(
        ValueError, match=r"does not fit the model's backbone: shapes differ.*\(64, 3, 7, 7\)"
    ):
        load_segmentation_init(DeepLabV2(21, backbone="tiny", weights="none"), path)


def test_pipeline_layout_through_the_constructor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = randomise(DeepLabV2(5, backbone="tiny", weights="none"), seed=3)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"base.{k}": v for k, v in trained.state_dict().items()}, "meta": {}}, path)
    model = DeepLabV2(5, backbone="tiny", weights=str(path))
    assert model.init_report is not None and model.init_report.layout == "pipeline"
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert DeepLabV2(5, backbone="tiny", weights="none").init_report is None
