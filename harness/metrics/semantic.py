"""Semantic segmentation: per-class intersection over union (IoU) and mIoU.

Definition (the usual point-cloud segmentation mIoU, as reported on ScanNet,
S3DIS and SemanticKITTI, computed from a confusion matrix accumulated over
all points of all scenes):

* Only points whose ground-truth label is not ``ignore_index`` count; what is
  predicted at an ignored point does not matter.
* For class ``c``: ``TP`` = points with gt ``c`` predicted ``c``;
  ``FP`` = points with gt ``!= c`` predicted ``c``; ``FN`` = points with gt
  ``c`` predicted anything else.  ``IoU_c = TP / (TP + FP + FN)``.
* A prediction outside ``[0, num_classes)`` is a false positive for no class
  but still a false negative for the point's gt class (as ScanNet's
  ``evaluate_semantic_label.py``, which maps it to an unknown id and counts the
  whole gt row as FN).
* A class absent from both the (non-ignored) gt and the predictions at
  non-ignored points has no IoU.  Two conventions (``absent``):
  ``"nan"`` (ScanNet's ``evaluate_semantic_label.py``; also used for S3DIS,
  which ships no evaluation script): its IoU is NaN
  and ``miou`` is the mean over the other classes (NaN if none is left; the
  script itself prints per-class IoUs and no mean);
  ``"zero"`` (SemanticKITTI's ``np_ioueval.py``: ``tp / (tp + fp + fn +
  1e-15)``): its IoU is 0 and it counts in the mean.  They differ only on
  splits that lack a class, e.g. a few scans.

The confusion matrix has shape ``(num_classes, num_classes + 1)``: rows are gt
classes, columns predicted classes, and the last column counts predictions
outside ``[0, num_classes)``.  Confusion matrices of several scenes add up, so
a task can accumulate ``confusion_matrix`` over scenes and call
``iou_from_confusion`` once.
"""
from __future__ import annotations

import numpy as np

__all__ = ["confusion_matrix", "iou_from_confusion", "semantic_iou", "ABSENT_CLASS_CONVENTIONS"]

ABSENT_CLASS_CONVENTIONS = ("nan", "zero")


def confusion_matrix(pred, gt, num_classes: int, ignore_index=None) -> np.ndarray:
    """Confusion matrix ``(num_classes, num_classes + 1)`` (int64) of one scene.

    ``cm[g, p]`` counts points with gt ``g`` predicted ``p``; ``cm[g, -1]``
    counts points with gt ``g`` whose prediction is outside
    ``[0, num_classes)``.  Points with gt ``ignore_index`` are skipped; a gt
    label outside ``[0, num_classes)`` that is not ``ignore_index`` raises
    ``ValueError``.
    """
    num_classes = int(num_classes)
    if num_classes <= 0:
        raise ValueError("num_classes must be positive")
    pred = np.asarray(pred).reshape(-1)
    gt = np.asarray(gt).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in length: {pred.shape[0]} vs {gt.shape[0]}")
    for name, a in (("pred", pred), ("gt", gt)):
        if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise TypeError(f"{name} must hold integer labels, got {a.dtype}")
    gt = gt.astype(np.int64, copy=False)
    pred = pred.astype(np.int64, copy=False)
    if ignore_index is not None:
        keep = gt != ignore_index
        gt = gt[keep]
        pred = pred[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = gt[(gt < 0) | (gt >= num_classes)][0]
        raise ValueError(f"gt label {bad} is outside [0, {num_classes}) and is not ignore_index")
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    width = num_classes + 1
    cm = np.bincount(gt * width + pred, minlength=num_classes * width)
    return cm.reshape(num_classes, width).astype(np.int64, copy=False)


def iou_from_confusion(cm, absent: str = "nan") -> dict:
    """``{'miou': float, 'per_class': (C,) float array}`` from a confusion matrix.

    Accepts the ``(C, C + 1)`` matrix of :func:`confusion_matrix` (or a sum of
    them) or a plain square ``(C, C)`` matrix (rows gt, columns prediction).
    ``absent``: the IoU of a class in neither gt nor predictions, ``"nan"``
    (left out of the mean) or ``"zero"`` (see the module docstring).
    """
    if absent not in ABSENT_CLASS_CONVENTIONS:
        raise ValueError(f"absent must be one of {ABSENT_CLASS_CONVENTIONS}, got {absent!r}")
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[1] not in (cm.shape[0], cm.shape[0] + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C+1), got {cm.shape}")
    c = cm.shape[0]
    square = cm[:, :c]
    tp = np.diag(square)
    fp = square.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = tp + fp + fn
    valid = denom > 0
    per_class = np.full(c, np.nan if absent == "nan" else 0.0)
    per_class[valid] = tp[valid] / denom[valid]
    counted = valid if absent == "nan" else np.ones(c, dtype=bool)
    miou = float(per_class[counted].mean()) if counted.any() else float("nan")
    return {"miou": miou, "per_class": per_class}


def semantic_iou(pred, gt, num_classes: int, ignore_index=None, absent: str = "nan") -> dict:
    """Per-class IoU and mIoU of integer predictions ``pred`` vs labels ``gt``.

    Returns ``{'miou': float, 'per_class': np.ndarray (num_classes,)}``; see
    the module docstring for the exact definition and ``absent``.
    """
    return iou_from_confusion(confusion_matrix(pred, gt, num_classes, ignore_index), absent)
