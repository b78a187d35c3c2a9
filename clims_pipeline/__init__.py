"""The example pipeline that reproduces CLIMS on PASCAL VOC 2012 / MS-COCO 2014.

It is a small package of stages (``train_cam``, ``train_clims``, ``make_cam``, ``eval_cam``, ...) that share a
work directory. ``examples/voc_full_pipeline.py`` is its command-line entry point; see ``docs/pipeline.md``.
"""
