"""Segmentation metrics: confusion matrices, IoU, and a background-threshold sweep in one pass over the data.

The sweep does not build one confusion matrix per threshold. For every pixel it records the ground-truth
class,
the arg-max foreground class and *how many* thresholds lie strictly below the pixel's maximum CAM score; a
pixel is foreground at threshold ``t_j`` exactly when that count exceeds ``j``. One ``bincount`` per image
fills
a (C, C, T+1) histogram from which every threshold's confusion matrix is a cumulative sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU from a (C, C) confusion matrix (rows ground truth, columns prediction); NaN where a class
    is absent from both."""
    confusion = confusion.astype(np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def mean_iou(iou: np.ndarray) -> float:
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def confusion_matrix(
    ground_truth: np.ndarray, prediction: np.ndarray, num_labels: int, void_label: int = 255
) -> np.ndarray:
    valid = ground_truth != void_label
    flat = ground_truth[valid].astype(np.int64) * num_labels + prediction[valid].astype(np.int64)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


class ThresholdSweep:
    """Accumulates CAM predictions against ground truth for every background threshold at once.

    ``num_labels`` counts background (label 0) plus the foreground classes.
    """

    def __init__(self, num_labels: int, thresholds: Sequence[float] | np.ndarray, void_label: int = 255):
        self.num_labels = num_labels
        self.thresholds = np.asarray(sorted(thresholds), dtype=np.float64)
        self.void_label = void_label
        self.histogram = np.zeros((num_labels, num_labels, len(self.thresholds) + 1), dtype=np.int64)

    def add(
        self, ground_truth: np.ndarray, foreground_class: np.ndarray, foreground_score: np.ndarray
    ) -> None:
        """ground_truth (H, W) labels (void allowed); foreground_class (H, W) the arg-max class in
        1..C-1 (0 where an image has no candidate class); foreground_score (H, W) its score."""
        valid = ground_truth != self.void_label
        gt = ground_truth[valid].astype(np.int64)
        if gt.size and gt.max() >= self.num_labels:
            raise ValueError(
                f"ground truth holds label {int(gt.max())}, expected < {self.num_labels} or void "
                f"{self.void_label}"
            )
        thresholds_below = np.searchsorted(self.thresholds, foreground_score[valid], side="left")
        bins = len(self.thresholds) + 1
        flat = (gt * self.num_labels + foreground_class[valid].astype(np.int64)) * bins + thresholds_below
        self.histogram += np.bincount(flat, minlength=self.histogram.size).reshape(self.histogram.shape)

    def confusion_at(self, index: int) -> np.ndarray:
        """The confusion matrix at ``thresholds[index]``."""
        foreground = self.histogram[:, :, index + 1 :].sum(axis=2)
        confusion = np.zeros((self.num_labels, self.num_labels), dtype=np.int64)
        confusion[:, 1:] = foreground[:, 1:]
        confusion[:, 0] = self.histogram.sum(axis=(1, 2)) - foreground[:, 1:].sum(axis=1)
        return confusion

    def miou_per_threshold(self) -> np.ndarray:
        return np.array(
            [mean_iou(iou_from_confusion(self.confusion_at(j))) for j in range(len(self.thresholds))]
        )


def format_iou_table(title: str, class_names: Sequence[str], iou: np.ndarray, summary: str) -> str:
    """A Markdown table of per-class IoU (in %), with the mean on the last row."""
    lines = [f"### {title}", "", "| class | IoU (%) |", "| --- | ---: |"]
    lines += [
        f"| {name} | {'n/a' if np.isnan(value) else f'{100 * value:.1f}'} |"
        for name, value in zip(class_names, iou, strict=True)
    ]
    lines += [f"| **mIoU** | **{100 * mean_iou(iou):.1f}** |", "", summary]
    return "\n".join(lines)
