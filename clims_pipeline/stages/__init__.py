"""Stage modules. Importing this package registers every stage (see ``clims_pipeline.context``)."""

from . import (  # noqa: F401
    check_clip,
    eval_cam,
    eval_seg,
    make_cam,
    make_rw,
    make_sem_seg,
    mine_backgrounds,
    report,
    train_aff,
    train_cam,
    train_clims,
    train_clip,
    train_irn,
    train_seg,
)
