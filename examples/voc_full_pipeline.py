"""Reproduce the CLIMS pipeline on PASCAL VOC 2012 (or MS-COCO 2014). See docs/pipeline.md.

python examples/voc_full_pipeline.py --voc-root VOCdevkit/VOC2012 --workdir runs/voc
torchrun --nproc_per_node=4 examples/voc_full_pipeline.py --voc-root VOCdevkit/VOC2012 --workdir runs/voc
"""

import sys
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES_DIR))
try:
    import clims_loss  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    if (EXAMPLES_DIR.parent / "clims_loss").is_dir():
        sys.path.insert(0, str(EXAMPLES_DIR.parent))

from clims_pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
