"""Stage ``train_clip``: the CLIP that train_clims' evaluator freezes, trained on captions.

* A generated world (a plug-in's caption source, e.g. ``--preset toy``): a tiny open_clip model trained
  from scratch on the world's captions, a few minutes on a CPU.
* Real data (``--set train_clip.enabled=true``): the camera-ready paper's fine-tuning of CLIP on label
  captions, "a photo of {class names}.", from the training split's labels (lr 5e-5, 20 epochs, weight
  decay 0.003).

The checkpoint is ``<workdir>/train_clip/model.pt`` under the run-state protocol (reused while its settings
hold). ``CLIPTextDrivenEvaluator.from_pretrained(<model>, pretrained=<file>)`` loads it;
``train_clims.clip_pretrained = "train_clip"`` points train_clims at it.
"""

from __future__ import annotations

from dataclasses import asdict

from ..clip_captions import caption_corpus
from ..clip_setup import clip_checkpoint_path, clip_directory, register_clip_configs
from ..clip_training import train_clip
from ..context import Stage, StageContext, register_stage
from ..distributed import barrier


@register_stage
class TrainClip(Stage):
    name, order = "train_clip", 5
    help = (
        "train (generated worlds) or fine-tune (label captions) the CLIP of the evaluator; off unless enabled"
    )

    def run(self, ctx: StageContext) -> None:
        config = ctx.config.train_clip
        if not config.enabled:
            ctx.print(
                "[train_clip] disabled (train_clip.enabled=false): train_clims uses its clip_pretrained"
            )
            return
        # One CLIP per data set: every pipeline seed shares it (it is trained with seed 0).
        fingerprint = {**asdict(config), "data": ctx.source.fingerprint(), "seed": 0}
        output = ctx.output(self.name, clip_directory(ctx), fingerprint)
        out_path = clip_checkpoint_path(ctx)
        if output.reuse(out_path):
            return
        # An interrupted run with these settings resumes from model.pt.resume; one with other settings is
        # refused (use --force), like every trainer.
        output.begin(refuse_stale_partial=True)
        if ctx.dist.is_main:  # a few minutes of a small model: one process trains, the others wait
            register_clip_configs(ctx)
            corpus = caption_corpus(ctx)
            ctx.print(
                f"[train_clip] {config.model} on {len(corpus.samples)} captions ({config.captions}) "
                f"-> {out_path}"
            )
            result = train_clip(
                corpus.samples,
                model_name=config.model,
                pretrained=None if config.pretrained in ("", "none") else config.pretrained,
                epochs=config.epochs,
                lr=config.lr,
                weight_decay=config.weight_decay,
                batch_size=config.batch_size,
                seed=0,
                out_path=out_path,
                device=ctx.device,
                max_steps=config.max_steps,
                quick_gelu=config.pretrained == "openai",
                maskable=corpus.maskable,
                darken=corpus.darken,
                fixed_logit_scale=config.fixed_logit_scale,
                augment=corpus.augment,
            )
            ctx.logger(self.name).log("done", path=str(out_path), history=result.history)
        # The CLIP's size and sha256, checked when train_clims / mine_backgrounds load it.
        output.complete(proofs=[out_path.name])
        barrier()
