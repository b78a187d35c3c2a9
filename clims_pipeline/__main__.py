"""``python -m clims_pipeline``: the pipeline's command line (see ``clims_pipeline.cli``)."""

from .cli import main

raise SystemExit(main())
