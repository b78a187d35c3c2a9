"""What ``--dataset toy`` adds to the pipeline: the toy world generated into the work directory.

``clims-pipeline`` (or ``python examples/voc_full_pipeline.py``) without a data set root runs the toy
world: the world is written to ``<workdir>/toyworld`` on the first run (reused afterwards when its
settings match), stage ``train_clip`` trains the tiny CLIP on its captions, and every other stage runs as
on VOC.
"""

from __future__ import annotations

from pathlib import Path

from ..context import StageContext
from ..distributed import barrier

#: Where the main command works when no --workdir is given (relative to the current directory).
DEFAULT_TOY_WORKDIR = "runs/toyworld"
#: The stages the main command runs on the toy world (every stage except the background miner).
TOY_STAGES = (
    "train_clip",
    "train_cam",
    "check_clip",
    "train_clims",
    "make_cam",
    "eval_cam",
    "train_aff",
    "make_rw",
    "train_irn",
    "make_sem_seg",
    "train_seg",
    "eval_seg",
    "report",
)


def toy_world_root(workdir: Path) -> Path:
    return workdir / "toyworld"


def ensure_toy_world(ctx: StageContext) -> Path:
    """Generate the toy world of ``ctx.config.toy_world`` (main rank) unless it is there already.

    Only the work directory's own ``toyworld/`` is generated (or regenerated when its settings changed); a
    world given with ``--data-root`` (``--dataset toy``) is used as it is."""
    from .world import generate_toy_world, load_toy_world

    root = Path(ctx.config.data.root)
    config = ctx.config.section("toy_world")
    if root != toy_world_root(ctx.workdir):
        load_toy_world(root)  # raises when there is no complete world
        return root
    if ctx.dist.is_main:
        metadata = generate_toy_world(
            root,
            n_train=config.n_train,
            n_val=config.n_val,
            seed=config.seed,
            context_rate=config.context_rate,
            kind=config.kind,
            progress=True,
        )
        seconds = metadata["generation_seconds"]
        ctx.print(
            f"[toyworld] {root}: {metadata.get('kind', 'first')} world, {metadata['splits']} "
            f"(generated in {seconds} s)"
        )
    barrier()
    return root
