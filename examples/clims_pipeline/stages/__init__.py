"""Stage modules. Importing this package registers every stage (see ``clims_pipeline.context``)."""

from . import eval_cam, make_cam, train_cam, train_clims  # noqa: F401
