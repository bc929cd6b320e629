"""3D object detection: VoteNet's mean average precision over oriented boxes.

Definition: ``eval_det`` / ``eval_det_multiprocessing`` of VoteNet
(facebookresearch/votenet, ``utils/eval_det.py``, as driven by
``models/ap_helper.py``), the evaluation used for ScanNet and SUN RGB-D
detection (mAP@0.25, mAP@0.5), re-implemented from its definition.

Boxes are ``(cx, cy, cz, dx, dy, dz, heading)``: centre, *full* extents, and
``heading``, the angle in radians that turns the box's own x axis (along which
``dx`` is measured) counter-clockwise about +z (upright, z-up frame).
VoteNet's ``box_util.get_3d_box`` instead takes a clockwise angle in camera
axes, so its heading is the negative of ours.

3D IoU = (bird's-eye-view intersection area x vertical overlap) / union
volume.  The BEV intersection of the two rotated rectangles is computed
exactly (up to rounding) by clipping one rectangle with the four half-planes
of the other (Sutherland-Hodgman on convex quadrilaterals, vectorised over box
pairs); boxes that touch along an edge or a face, or at a corner, have IoU 0.
VoteNet's own clipping (``polygon_clip`` + ``ConvexHull``) errs or raises on
those cases and also wherever edges of the two boxes coincide, identical boxes
included (e.g. an identical pair scored 4.37, two boxes of true IoU 1/3 scored
0.6); it is not used here. Everywhere else the two agree (15,000 random pairs
against VoteNet's ``box3d_iou``, 2026-11-27).

AP, per class ``c`` with IoU threshold ``t``:

1. The predictions of class ``c`` of all scenes, sorted by descending score
   (``np.argsort(-scores)`` over predictions concatenated scene by scene in
   list order, as VoteNet does, so ties resolve the same way).
2. Each is compared with the gt box of class ``c`` in its own scene of
   highest 3D IoU (the first such box on ties), whether or not that box is
   already matched: a true positive if the IoU is strictly greater than ``t``
   and the box is unmatched (it becomes matched), otherwise a false positive.
   A prediction in a scene with no gt box of its class is a false positive.
3. ``recall = cumTP / n_gt``, ``precision = cumTP / (cumTP + cumFP)``; AP is
   the area under the precision envelope (all-point VOC AP, sentinels
   recall 0 / 1 with precision 0; not the 11-point VOC07 metric).
4. A class with gt but no prediction has AP 0 (as in
   ``eval_det_multiprocessing``, which ``ap_helper`` uses).  A class with no
   gt in any scene gets NaN and is left out of ``map`` (in VoteNet such a
   class, if it has predictions, gets AP NaN and turns its mAP into NaN).

Only labels in ``class_ids`` are evaluated; other boxes are ignored.
"""
from __future__ import annotations

import numpy as np

__all__ = ["box_corners_bev", "box3d_iou", "bev_intersection_area", "detection_ap"]

_CHUNK = 32768  # box pairs clipped at once


def _as_boxes(boxes, name="boxes"):
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return b.reshape(0, 7)
    if b.shape[-1] != 7:
        raise ValueError(f"{name} must have 7 values per box (cx, cy, cz, dx, dy, dz, heading), got shape {b.shape}")
    b = b.reshape(-1, 7)
    if np.any(b[:, 3:6] < 0):
        raise ValueError(f"{name} have negative extents")
    return b


def _cos_sin(heading):
    c = np.cos(heading)
    s = np.sin(heading)
    # make headings that are multiples of pi/2 exactly axis-aligned
    c = np.where(np.abs(c) < 1e-14, 0.0, c)
    s = np.where(np.abs(s) < 1e-14, 0.0, s)
    return c, s


def box_corners_bev(boxes) -> np.ndarray:
    """Bird's-eye-view corners, counter-clockwise: ``(..., 7) -> (..., 4, 2)``."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape[-1] != 7:
        raise ValueError(f"boxes must end in 7 values, got shape {b.shape}")
    hx = b[..., 3] / 2.0
    hy = b[..., 4] / 2.0
    # local corners, counter-clockwise: (-,-), (+,-), (+,+), (-,+)
    lx = np.stack([-hx, hx, hx, -hx], axis=-1)
    ly = np.stack([-hy, -hy, hy, hy], axis=-1)
    c, s = _cos_sin(b[..., 6])
    c = c[..., None]
    s = s[..., None]
    x = b[..., 0:1] + c * lx - s * ly
    y = b[..., 1:2] + s * lx + c * ly
    return np.stack([x, y], axis=-1)


def _clip_area(subject, clip):
    """Area of the intersection of convex CCW polygons, pairwise.

    ``subject``: (K, S, 2), ``clip``: (K, 4, 2), both counter-clockwise.
    Polygons are stored in fixed slots, padded by repeating a vertex
    (repeated vertices change neither the clipping nor the area).
    """
    k = subject.shape[0]
    poly = subject
    for e in range(clip.shape[1]):
        a = clip[:, e][:, None, :]  # (K,1,2)
        ab = clip[:, (e + 1) % clip.shape[1]][:, None, :] - a
        # >= 0: on the left of (inside) or on the clip line
        d = ab[..., 0] * (poly[..., 1] - a[..., 1]) - ab[..., 1] * (poly[..., 0] - a[..., 0])
        prev = np.roll(poly, 1, axis=1)
        dprev = np.roll(d, 1, axis=1)
        inside = d >= 0
        crosses = inside != (dprev >= 0)
        # on a crossing exactly one of d, dprev is < 0, so the denominator is nonzero
        denom = np.where(crosses, dprev - d, 1.0)
        t = np.where(crosses, dprev / denom, 0.0)
        hit = prev + t[..., None] * (poly - prev)
        out = np.stack([hit, poly], axis=2).reshape(k, -1, 2)
        valid = np.stack([crosses, inside], axis=2).reshape(k, -1)
        nvalid = valid.sum(axis=1)
        width = max(int(nvalid.max()) if k else 1, 1)
        order = np.argsort(~valid, axis=1, kind="stable")[:, :width]
        out = np.take_along_axis(out, order[..., None], axis=1)
        # pad with the last valid vertex; an empty polygon becomes a point
        fill = np.minimum(np.arange(width)[None, :], np.maximum(nvalid - 1, 0)[:, None])
        out = np.take_along_axis(out, fill[..., None], axis=1)
        out[nvalid == 0] = 0.0
        poly = out
    x = poly[..., 0]
    y = poly[..., 1]
    cross = x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y
    return np.abs(cross.sum(axis=1)) * 0.5


def bev_intersection_area(a, b) -> np.ndarray:
    """BEV intersection areas of boxes ``a`` (N,7) and ``b`` (M,7): (N, M)."""
    a = _as_boxes(a, "a")
    b = _as_boxes(b, "b")
    area = np.zeros((a.shape[0], b.shape[0]))
    if area.size == 0:
        return area
    return _bev_area_pairs(a, b, np.ones(area.shape, dtype=bool))


def _bev_area_pairs(a, b, candidates):
    area = np.zeros((a.shape[0], b.shape[0]))
    # circumscribed circles: pairs that cannot touch are skipped
    ra = 0.5 * np.hypot(a[:, 3], a[:, 4])
    rb = 0.5 * np.hypot(b[:, 3], b[:, 4])
    dist = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    candidates = candidates & (dist <= (ra[:, None] + rb[None, :]) * (1 + 1e-9))
    candidates &= (a[:, 3] * a[:, 4] > 0)[:, None] & (b[:, 3] * b[:, 4] > 0)[None, :]
    ii, jj = np.nonzero(candidates)
    if ii.size == 0:
        return area
    ca = box_corners_bev(a)
    cb = box_corners_bev(b)
    for start in range(0, ii.size, _CHUNK):
        i = ii[start:start + _CHUNK]
        j = jj[start:start + _CHUNK]
        area[i, j] = _clip_area(ca[i], cb[j])
    # clipping cannot make the intersection larger than either rectangle
    full = np.minimum((a[:, 3] * a[:, 4])[:, None], (b[:, 3] * b[:, 4])[None, :])
    return np.minimum(area, full)


def box3d_iou(a, b):
    """3D IoU of oriented boxes.

    Two (7,) boxes give a float; ``(N, 7)`` and ``(M, 7)`` give an ``(N, M)``
    matrix.  Degenerate (zero-volume) pairs with an empty union give 0.
    """
    single = np.ndim(a) == 1 and np.ndim(b) == 1
    A = _as_boxes(a, "a")
    B = _as_boxes(b, "b")
    n, m = A.shape[0], B.shape[0]
    if n == 0 or m == 0:
        return np.zeros((n, m))
    top = np.minimum((A[:, 2] + A[:, 5] / 2)[:, None], (B[:, 2] + B[:, 5] / 2)[None, :])
    bottom = np.maximum((A[:, 2] - A[:, 5] / 2)[:, None], (B[:, 2] - B[:, 5] / 2)[None, :])
    height = np.maximum(top - bottom, 0.0)
    area = _bev_area_pairs(A, B, height > 0)
    inter = area * height
    vol_a = A[:, 3] * A[:, 4] * A[:, 5]
    vol_b = B[:, 3] * B[:, 4] * B[:, 5]
    union = vol_a[:, None] + vol_b[None, :] - inter
    iou = np.zeros((n, m))
    ok = union > 0
    iou[ok] = inter[ok] / union[ok]
    iou = np.clip(iou, 0.0, 1.0)
    return float(iou[0, 0]) if single else iou


def _voc_ap(rec, prec):
    """Area under the precision envelope (all-point VOC AP)."""
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _parse_scene(item, kind):
    if kind == "gt":
        if len(item) != 2:
            raise ValueError("each gt scene must be (boxes (M,7), labels (M,))")
        boxes, labels = item
        scores = None
    else:
        if len(item) != 3:
            raise ValueError("each prediction scene must be (boxes (K,7), labels (K,), scores (K,))")
        boxes, labels, scores = item
    boxes = _as_boxes(boxes, f"{kind} boxes")
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"{kind}: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != boxes.shape[0]:
            raise ValueError(f"pred: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    return boxes, labels, scores


def detection_ap(gt, pred, class_ids, iou_threshold: float = 0.5) -> dict:
    """VoteNet-style detection AP (see the module docstring).

    ``gt``: list (one per scene) of ``(boxes (M,7), labels (M,))``;
    ``pred``: list of ``(boxes (K,7), labels (K,), scores (K,))``.
    Returns ``{'map': float, 'per_class': {label_id: float}}``.
    """
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} gt scenes but {len(pred)} prediction scenes")
    gts = [_parse_scene(g, "gt") for g in gt]
    preds = [_parse_scene(p, "pred") for p in pred]
    classes = list(dict.fromkeys(int(c) for c in np.asarray(class_ids).reshape(-1).tolist()))
    thr = float(iou_threshold)

    per_class = {}
    for c in classes:
        npos = int(sum(np.count_nonzero(gl == c) for _, gl, _ in gts))
        if npos == 0:
            per_class[c] = float("nan")
            continue
        scores, scene_of, row_of, ious, matched = [], [], [], [], []
        for s, ((gb, gl, _), (pb, pl, ps)) in enumerate(zip(gts, preds)):
            g = gb[gl == c]
            pm = pl == c
            ious.append(box3d_iou(pb[pm], g) if g.shape[0] else None)
            matched.append(np.zeros(g.shape[0], dtype=bool))
            k = int(np.count_nonzero(pm))
            scores.append(ps[pm])
            scene_of.append(np.full(k, s))
            row_of.append(np.arange(k))
        conf = np.concatenate(scores)
        if conf.size == 0:
            per_class[c] = 0.0
            continue
        scene_of = np.concatenate(scene_of)
        row_of = np.concatenate(row_of)
        order = np.argsort(-conf)
        tp = np.zeros(conf.size)
        fp = np.zeros(conf.size)
        for rank, d in enumerate(order):
            s, r = scene_of[d], row_of[d]
            if ious[s] is None:
                fp[rank] = 1.0
                continue
            row = ious[s][r]
            j = int(np.argmax(row))
            if row[j] > thr and not matched[s][j]:
                tp[rank] = 1.0
                matched[s][j] = True
            else:
                fp[rank] = 1.0
        tp = np.cumsum(tp)
        fp = np.cumsum(fp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[c] = _voc_ap(rec, prec)

    vals = np.array([v for v in per_class.values() if not np.isnan(v)])
    return {"map": float(vals.mean()) if vals.size else float("nan"), "per_class": per_class}
