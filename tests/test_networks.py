"""Networks and CAM inference of the example pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

# isort: split
from clims_pipeline.cams import multiscale_cams, normalise_by_max, same_size_batches
from clims_pipeline.networks import CAMNet, CLIMSNet, ResNet50Backbone, build_network


def test_resnet50_backbone_has_output_stride_16_frozen_stem_and_frozen_statistics(tmp_path: Path) -> None:
    import torchvision

    # --backbone-weights FILE: a torchvision state dict (its fc.* keys are ignored)
    reference = torchvision.models.resnet50(weights=None)
    weights_path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), weights_path)
    model = CAMNet(ResNet50Backbone(str(weights_path)), num_classes=20)
    torch.testing.assert_close(model.backbone.stem[0].weight, reference.conv1.weight)
    assert model.activation_maps(torch.randn(1, 3, 64, 96)).shape == (1, 20, 4, 6)
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    backbone_params, head_params = model.parameter_groups()
    assert head_params == [model.classifier.weight] and model.classifier.bias is None
    assert len(backbone_params) == sum(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        ResNet50Backbone(str(tmp_path / "missing.pth"))


def test_clims_network_loads_the_cam_network_and_returns_sigmoid_maps() -> None:
    torch.manual_seed(0)
    cam_net = build_network("cam", "tiny", "none", 20)
    clims_net = build_network("clims", "tiny", "none", 20)
    clims_net.load_state_dict(cam_net.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = clims_net(images)
    assert isinstance(clims_net, CLIMSNet) and maps.shape == (2, 20, 4, 4)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    with torch.no_grad():
        logits = cam_net.classifier(cam_net.backbone(images))
        torch.testing.assert_close(torch.logit(clims_net(images)), logits, atol=1e-4, rtol=1e-4)
    assert cam_net(images).shape == (2, 20)


def test_multiscale_cams_shapes_and_flip_symmetry() -> None:
    torch.manual_seed(0)
    model = build_network("cam", "tiny", "none", 20).eval()
    images = torch.randn(2, 3, 37, 50)
    low, high = multiscale_cams(model, images, (1.0, 0.5, 1.5), flip=True, low_stride=4, amp=False)
    assert low.shape == (2, 20, math.ceil(37 / 4), math.ceil(50 / 4)) and high.shape == (2, 20, 37, 50)
    assert float(high.min()) >= 0.0
    # With flips summed in, the maps of a mirrored image are the mirrored maps, when every scaled size is a
    # multiple of the stride (otherwise the two passes' feature grids are anchored at opposite edges).
    images = torch.randn(2, 3, 64, 96)
    _, high = multiscale_cams(model, images, (1.0, 0.5), flip=True, low_stride=4, amp=False)
    _, high_mirrored = multiscale_cams(model, images.flip(-1), (1.0, 0.5), flip=True, low_stride=4, amp=False)
    torch.testing.assert_close(high_mirrored, high.flip(-1), atol=1e-4, rtol=1e-4)
    normalised = normalise_by_max(high[0])
    assert float(normalised.flatten(1).amax(1).max()) <= 1.0


def test_same_size_batches() -> None:
    sizes = [(2, 3), (2, 3), (2, 3), (4, 4), (5, 1), (5, 1)]
    assert list(same_size_batches(sizes, batch_size=2)) == [[0, 1], [2], [3], [4, 5]]


def test_toy_backbone_receptive_field_follows_its_dilations() -> None:
    # The pixels that reach one stride-4 feature through the convolutions: about 31 px with dilations
    # (1, 1, 1), nearly the whole 64-px image with (2, 4, 2). GroupNorm is taken out: its per-image statistics
    # connect every pixel to every feature, but only as one shift and scale per channel.
    from clims_pipeline.networks import SmallImageBackbone

    def reach(dilations: tuple[int, int, int]) -> int:
        torch.manual_seed(0)
        backbone = SmallImageBackbone(dilations=dilations).eval()
        for block in (backbone.stem, *backbone.layers):
            block[1] = torch.nn.Identity()
        image = torch.randn(1, 3, 64, 64, requires_grad=True)
        backbone(image)[0, :, 8, 8].sum().backward()
        columns = torch.nonzero(image.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
        return int(columns.max() - columns.min() + 1)

    assert 25 <= reach((1, 1, 1)) <= 33
    assert reach((2, 4, 2)) >= 55  # 71 px in theory, clipped by the frame
    with pytest.raises(ValueError, match="3 dilations"):
        SmallImageBackbone(dilations=(1, 1))  # type: ignore[arg-type]


def test_optimizer_choice_keeps_the_head_group_and_rejects_unknown_names() -> None:
    import dataclasses

    from clims_pipeline.config import TrainConfig
    from clims_pipeline.training import optimizer_with_head_group

    model = build_network("cam", "tiny", "none", 3)
    config = TrainConfig(lr=1e-3, head_lr_mult=10.0, optimizer="adamw")
    optimizer, base_lrs = optimizer_with_head_group(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert base_lrs == [1e-3, 1e-2]
    assert [group["lr"] for group in optimizer.param_groups] == base_lrs
    head = list(model.classifier.parameters())
    assert optimizer.param_groups[1]["params"] == head
    sgd, _ = optimizer_with_head_group(model, dataclasses.replace(config, optimizer="sgd"))
    assert isinstance(sgd, torch.optim.SGD)
    with pytest.raises(ValueError, match="optimizer one of"):
        optimizer_with_head_group(model, dataclasses.replace(config, optimizer="adam"))
