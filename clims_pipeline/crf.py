"""Fully connected CRF (Krähenbühl & Koltun, NeurIPS 2011): the one dense-CRF helper of the pipeline.

Two stages need it, with the parameters of their reference set-ups:

* ``make_rw`` / ``train_aff`` (PSA, Ahn & Kwak 2018): refine the CAM scores into confident affinity labels,
  and optionally the random-walk result (:data:`PSA_CRF`);
* ``train_irn`` (IRN, Ahn, Cho & Kwak 2019): smooth the confident label maps of the relation labels, from
  hard labels (:func:`dense_crf_labels`, :data:`IRN_LABEL_CRF`);
* ``eval_seg`` (DeepLabV2 as configured in deeplab-pytorch): post-process the segmentation scores
  (:data:`DEEPLAB_CRF`).

It runs ``pydensecrf2`` (imported as ``pydensecrf``), which the ``crf`` extra installs; without it,
:func:`dense_crf` raises an ImportError that names the extra.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np

CRF_INSTALL_HINT = 'pip install "clims-loss[crf]"  (it installs pydensecrf2)'


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and the two Gaussian edge potentials (positions in pixels, colours in 0..255)."""

    iterations: int = 10
    gaussian_sxy: float = 3.0  # smoothness kernel: position scale
    gaussian_compat: float = 3.0  # ... and its weight
    bilateral_sxy: float = 80.0  # appearance kernel: position scale
    bilateral_srgb: float = 13.0  # ... colour scale
    bilateral_compat: float = 10.0  # ... and its weight

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


#: PSA's CRF (affinity labels from CAMs).
PSA_CRF = CRFParams(iterations=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13,
                    bilateral_compat=10)  # fmt: skip
#: IRN's label CRF (relation labels from CAMs): Gaussian 3/3, bilateral 50/5/10.
IRN_LABEL_CRF = CRFParams(
    iterations=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=50, bilateral_srgb=5, bilateral_compat=10
)
#: deeplab-pytorch's CRF for DeepLabV2 on VOC (POS_W 3, POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3).
DEEPLAB_CRF = CRFParams(iterations=10, gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                        bilateral_compat=4)  # fmt: skip


def crf_available() -> bool:
    try:
        require_densecrf()
    except ImportError:
        return False
    return True


def require_densecrf() -> ModuleType:
    """The ``pydensecrf.densecrf`` module, or an ImportError that says which extra provides it."""
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as error:
        raise ImportError(f"dense CRF post-processing needs pydensecrf2: {CRF_INSTALL_HINT}") from error
    module: ModuleType = densecrf  # pydensecrf has no type information: the import is Any
    return module


def dense_crf(image: np.ndarray, probabilities: np.ndarray, params: CRFParams = PSA_CRF) -> np.ndarray:
    """Refine per-pixel class probabilities with a dense CRF.

    image: (H, W, 3) uint8 RGB. probabilities: (C, H, W), non-negative; each pixel's scores are normalised to
    sum to 1 (so un-normalised scores such as CAMs with a background power are accepted). Returns the CRF's
    marginals (C, H, W) float32.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected image of shape (H, W, 3) and dtype uint8, got {image.shape} {image.dtype}"
        )
    if probabilities.ndim != 3 or probabilities.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"expected probabilities of shape (C, {image.shape[0]}, {image.shape[1]}) matching the image, "
            f"got {probabilities.shape}"
        )
    densecrf = require_densecrf()
    num_labels, height, width = probabilities.shape
    scores = np.clip(probabilities.astype(np.float32), 0.0, None)
    scores = scores / np.maximum(scores.sum(axis=0, keepdims=True), 1e-8)
    # The unary energy is the negative log-probability; the floor keeps log(0) finite.
    unary = -np.log(np.clip(scores, 1e-5, 1.0)).reshape(num_labels, -1)
    model: Any = densecrf.DenseCRF2D(width, height, num_labels)
    model.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    model.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    model.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),  # pydensecrf rejects read-only buffers
        compat=params.bilateral_compat,
    )
    marginals = model.inference(params.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def dense_crf_labels(
    image: np.ndarray, labels: np.ndarray, num_labels: int, params: CRFParams, confidence: float = 0.7
) -> np.ndarray:
    """Smooth a hard label map (H, W) of values ``0..num_labels-1`` with a dense CRF; returns the arg-max
    (H, W) int64.

    Each pixel's unary trusts its label with probability ``confidence`` and spreads the rest evenly over the
    other labels (IRN's set-up, 0.7). One label only: returned as it is (there is nothing to decide).
    """
    if labels.shape != image.shape[:2]:
        raise ValueError(f"expected labels of shape {image.shape[:2]} matching the image, got {labels.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"expected confidence in (0, 1), got {confidence}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"expected labels in 0..{num_labels - 1}, got {labels.min()}..{labels.max()}")
    if num_labels < 2:
        return labels.astype(np.int64)
    rest = (1.0 - confidence) / (num_labels - 1)
    probabilities = np.full((num_labels, *labels.shape), rest, dtype=np.float32)
    np.put_along_axis(probabilities, labels[None].astype(np.int64), confidence, axis=0)
    refined: np.ndarray = dense_crf(image, probabilities, params).argmax(axis=0)
    return refined
