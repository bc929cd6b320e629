"""Evaluation metrics of the downstream tasks (pure numpy, no torch).

* :func:`semantic_iou` (+ :func:`confusion_matrix`, :func:`iou_from_confusion`):
  semantic segmentation mIoU (module :mod:`harness.metrics.semantic`).
* :func:`instance_ap`: ScanNet benchmark instance-segmentation AP / AP50 / AP25
  (module :mod:`harness.metrics.instance`).
* :func:`detection_ap`, :func:`box3d_iou`, :func:`box_corners_bev`: VoteNet's
  3D detection mAP over oriented boxes (module :mod:`harness.metrics.detection`).
"""
from . import detection, instance, semantic
from .detection import bev_intersection_area, box3d_iou, box_corners_bev, detection_ap
from .instance import instance_ap
from .semantic import confusion_matrix, iou_from_confusion, semantic_iou

__all__ = [
    "semantic_iou",
    "confusion_matrix",
    "iou_from_confusion",
    "instance_ap",
    "detection_ap",
    "box3d_iou",
    "box_corners_bev",
    "bev_intersection_area",
    "semantic",
    "instance",
    "detection",
]
