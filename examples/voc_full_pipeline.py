"""Reproduce the CLIMS pipeline on PASCAL VOC 2012 (or MS-COCO 2014). See docs/pipeline.md.

python examples/voc_full_pipeline.py --voc-root VOCdevkit/VOC2012 --workdir runs/voc
torchrun --nproc_per_node=4 examples/voc_full_pipeline.py --voc-root VOCdevkit/VOC2012 --workdir runs/voc

The pipeline is the package ``clims_pipeline``, installed with ``pip install -e ".[examples]"``; the same
command line is ``clims-pipeline`` (or ``python -m clims_pipeline``).
"""

from clims_pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
