"""Stage ``make_cam``: multi-scale + flip CAM inference at full image resolution, sharded over ranks.

For every image of the training, evaluation and extra splits it saves ``<workdir>/make_cam/<source>/<id>.npy``
in the IRN/PSA format (see ``clims_pipeline.cams``). Images of equal size are inferred as one batch.
Finished images are kept on rerun; the files are recomputed from scratch when the source model changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cams import (
    cam_directory,
    limited,
    multiscale_cams,
    normalise_by_max,
    resolve_cam_source,
    same_size_batches,
)
from ..context import Stage, StageContext, register_stage
from ..data import FullImageDataset
from ..files import save_npy
from ..networks import CAMNet, build_network
from ..training import final_model_path, load_final_model, model_digest


def cam_splits(ctx: StageContext) -> list[str]:
    """The training split (refinement needs it; ``make_cam.include_train``), the evaluation split and the
    extra splits."""
    config = ctx.config.make_cam
    train = [ctx.config.data.train_split] if config.include_train else []
    return list(dict.fromkeys([*train, ctx.config.data.eval_split, *config.splits]))


def cam_image_ids(ctx: StageContext) -> list[str]:
    ids: dict[str, None] = {}
    for split in cam_splits(ctx):
        ids.update(dict.fromkeys(limited(ctx, ctx.validate_split(split, need_labels=True))))
    return list(ids)


def load_cam_network(ctx: StageContext, source: str) -> CAMNet:
    kind = "clims" if source == "train_clims" else "cam"
    # The weights come from the stage's model.pt; skip any backbone download.
    model = build_network(kind, ctx.config.network.backbone, "none", ctx.source.num_classes)
    load_final_model(final_model_path(ctx, source), model)
    return model.to(ctx.device).eval()


def image_size(ctx: StageContext, image_id: str) -> tuple[int, int]:
    with Image.open(ctx.source.image_path(image_id)) as image:
        width, height = image.size
    return int(width), int(height)


@register_stage
class MakeCam(Stage):
    name, order, help = "make_cam", 30, "multi-scale + flip CAM inference (npy per image)"

    def inputs(self, ctx: StageContext) -> tuple[str, ...]:
        return (resolve_cam_source(ctx),)

    def output_directory(self, ctx: StageContext) -> Path:
        return cam_directory(ctx)

    def check(self, ctx: StageContext) -> None:
        limit = ctx.config.make_cam.limit
        if limit is not None and limit < 1:
            raise ValueError(f"make_cam.limit: expected a positive number of images or null, got {limit}")
        readers = [name for name in ("train_aff", "make_rw") if name in ctx.requested_stages]
        if readers and (not ctx.config.make_cam.include_train or limit is not None):
            raise ValueError(
                f"{', '.join(readers)} read(s) the CAMs of the whole training split, but "
                f"make_cam.include_train={ctx.config.make_cam.include_train} and make_cam.limit={limit} "
                "leave some out; run them with the defaults"
            )
        cam_image_ids(ctx)

    def run(self, ctx: StageContext) -> None:
        config = ctx.config.make_cam
        source = resolve_cam_source(ctx)
        fingerprint = {
            "model": model_digest(ctx, source),
            "scales": list(config.scales),
            "flip": config.flip,
            "low_res_stride": config.low_res_stride,
        }
        output = ctx.output(self.name, cam_directory(ctx, source), fingerprint)
        image_ids = cam_image_ids(ctx)
        labels: dict[str, list[int]] = {}
        for split in cam_splits(ctx):
            labels.update(ctx.labels(split))
        model = load_cam_network(ctx, source)  # loads (and so checks) the model before anything is cleared
        output.begin()

        def path_of(image_id: str) -> Path:
            return output.directory / f"{image_id}.npy"

        todo = output.todo(image_ids, path_of, "images")
        # Sort by size so that equal-size images batch together, then deal them out so every rank gets a
        # similar mix.
        sizes = {image_id: image_size(ctx, image_id) for image_id in todo}
        todo.sort(key=lambda image_id: (sizes[image_id], image_id))
        shard = output.share(todo)
        loader = DataLoader(
            FullImageDataset(ctx.source, shard, labels),
            batch_sampler=list(same_size_batches([sizes[i] for i in shard], config.batch_size)),
            num_workers=ctx.config.data.num_workers,
        )
        progress = tqdm(
            total=len(shard),
            desc=f"make_cam (rank {ctx.dist.rank})" if ctx.dist.is_distributed else "make_cam",
            disable=not ctx.dist.is_main,
            dynamic_ncols=True,
        )
        for batch in loader:
            images = batch["image"].to(ctx.device)
            present = torch.nonzero(batch["label"].sum(dim=0)).flatten()  # classes positive in some image
            low, high = multiscale_cams(
                model,
                images,
                tuple(config.scales),
                config.flip,
                config.low_res_stride,
                ctx.amp,
                classes=present.to(ctx.device),
            )
            for position, image_id in enumerate(batch["id"]):
                keys = torch.nonzero(batch["label"][position]).flatten()
                channels = torch.searchsorted(present, keys).to(
                    ctx.device
                )  # where each key sits in `present`
                save_npy(
                    path_of(image_id),
                    {
                        "keys": keys.numpy().astype(np.int64),
                        "cam": normalise_by_max(low[position, channels]).cpu().numpy().astype(np.float32),
                        "high_res": normalise_by_max(high[position, channels])
                        .cpu()
                        .numpy()
                        .astype(np.float32),
                    },
                )
            progress.update(len(batch["id"]))
        progress.close()
        output.finish_files(image_ids, path_of, source=source)
        ctx.logger(self.name).log("done", images=len(image_ids), inferred=len(todo), source=source)
        ctx.print(f"[make_cam] wrote {len(image_ids)} CAM files to {output.directory}")
