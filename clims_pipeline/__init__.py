"""The example pipeline that reproduces CLIMS on PASCAL VOC 2012 / MS-COCO 2014.

It is a small package of stages (``train_cam``, ``train_clims``, ``make_cam``, ``eval_cam``, ...) that share a
work directory. Its command line is ``clims-pipeline`` (``python -m clims_pipeline``,
``examples/voc_full_pipeline.py``); see ``docs/pipeline.md``.
"""
