"""Add CLIMS to an existing ResNet-50 CAM trainer, end to end (the code of docs/integration.md).

    python examples/integrate_resnet50.py --clip ViT-B-32 --clip-pretrained openai   # real CLIP (download)
    python examples/integrate_resnet50.py --clip-pretrained /path/ViT-B-32.pt --quick-gelu
    python examples/integrate_resnet50.py --tiny                                    # offline smoke run

The data here is a random batch so that the script runs anywhere; replace `batches()` with your
VOC loader (ImageNet-normalised crops and 20-way multi-hot labels).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import open_clip
import torch
import torchvision
from torch import nn

import clims_loss as cl


class CAMNet(nn.Module):
    """The usual CAM network: ResNet-50 at output stride 16 and a bias-free 1x1 classifier.

    Trained as a classifier (GAP + multilabel soft margin) it is the baseline CAM; CLIMS keeps the
    same weights, drops the GAP and reads ``sigmoid(classifier(features))`` as the maps (Eq. 3).
    """

    def __init__(self, num_classes: int = 20, backbone_weights: str | None = None) -> None:
        super().__init__()
        resnet = torchvision.models.resnet50(
            weights=backbone_weights, replace_stride_with_dilation=[False, False, True]
        )
        self.backbone = nn.Sequential(*list(resnet.children())[:-2])
        self.classifier = nn.Conv2d(2048, num_classes, kernel_size=1, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, K, H/16, W/16)`` CAM logits."""
        return self.classifier(self.backbone(images))


def build_evaluator(args: argparse.Namespace) -> cl.CLIPTextDrivenEvaluator:
    if args.tiny:
        clip = open_clip.CLIP(
            embed_dim=64,
            vision_cfg={"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
            text_cfg={"context_length": 32, "width": 64, "heads": 2, "layers": 2},
        )
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=32)
        return cl.CLIPTextDrivenEvaluator(clip, tokenizer, prompts=args.preset)
    return cl.CLIPTextDrivenEvaluator.from_pretrained(
        args.clip,
        pretrained=args.clip_pretrained,
        quick_gelu=True if args.quick_gelu else None,
        prompts=args.preset,
        image_mean=cl.IMAGENET_MEAN,
        image_std=cl.IMAGENET_STD,
    )


def batches(batch_size: int, crop: int, num_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    while True:
        images = torch.randn(batch_size, 3, crop, crop, generator=generator)
        labels = (torch.rand(batch_size, num_classes, generator=generator) < 0.1).float()
        labels[:, 3] = 1.0  # every image has a boat, so the CBS term is exercised
        yield images, labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", default="ViT-B-32")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip tag or local checkpoint file")
    parser.add_argument("--quick-gelu", action="store_true", help="for a local copy of OpenAI weights")
    parser.add_argument("--preset", default="voc")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--tiny", action="store_true", help="tiny random CLIP and 64 px crops, offline")
    args = parser.parse_args()
    if args.tiny:
        args.crop = 64

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = CAMNet().to(device)  # load your baseline CAM weights here: model.load_state_dict(...)
    evaluator = build_evaluator(args).to(device)
    # The classifier learns 10x faster than the backbone, as in the paper's schedule.
    optimizer = torch.optim.SGD(
        [
            {"params": model.backbone.parameters(), "lr": args.lr},
            {"params": model.classifier.parameters(), "lr": 10 * args.lr},
        ],
        lr=args.lr,
        weight_decay=1e-4,
    )
    model.train()
    data = batches(args.batch_size, args.crop, num_classes=20)
    for step in range(args.steps):
        images, labels = (t.to(device) for t in next(data))
        cams = torch.sigmoid(model(images))
        out = evaluator(images, cams, labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.as_dict().items()))


if __name__ == "__main__":
    main()
