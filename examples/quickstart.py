"""The README's quick start: the CLIMS loss of a batch with a tiny random CLIP (offline, CPU)."""

import open_clip
import torch

import clims_loss as cl

# A tiny, randomly initialised CLIP so that this runs anywhere, offline.
# For real work: cl.CLIPTextDrivenEvaluator.from_pretrained("ViT-B-32", pretrained="openai").
clip = open_clip.CLIP(
    embed_dim=64,
    vision_cfg={"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    text_cfg={"context_length": 32, "width": 64, "heads": 2, "layers": 2},
)
tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=32)
evaluator = cl.CLIPTextDrivenEvaluator(clip, tokenizer, prompts="voc")

torch.manual_seed(0)
images = torch.randn(2, 3, 256, 256)  # ImageNet-normalised images
cams = torch.rand(2, 20, 32, 32, requires_grad=True)  # sigmoid CAMs, 20 VOC classes
labels = torch.zeros(2, 20)
labels[0, 3] = labels[1, 18] = 1.0  # a boat, a train
out = evaluator(images, cams, labels)
out.loss.backward()
print({name: round(value, 4) for name, value in out.as_dict().items()})
