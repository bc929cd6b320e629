"""Instance segmentation: ScanNet's average precision over mask IoU thresholds.

Definition: the ScanNet benchmark's ``evaluate_semantic_instance.py``
(``BenchmarkScripts/3d_evaluation``, itself adapted from the Cityscapes
instance evaluation), re-implemented from its definition; on every input on
which the official script runs, :func:`instance_ap` gives the same numbers.

Inputs, one entry per scene:

* ``gt``: an integer array over the scene's points holding
  ``label_id * 1000 + instance_id``.  Id 0 is no instance.  A point whose label
  (``id // 1000``) is not in ``class_ids`` is *void* (unannotated / not
  evaluated), label 0 included.
* ``pred``: a list of ``(mask, label_id, score)``; ``mask`` is a boolean (or
  0/1) array over the scene's points.

Rules (``th`` the IoU threshold; ``min_region_size`` = 100 points):

1. Predictions whose label is not in ``class_ids`` are dropped, then those with
   fewer than 100 points.  A ground-truth instance is every distinct non-zero
   id whose label is in ``class_ids``; it is *counted* (can be matched and can
   be missed) only if it has at least 100 points and ``id >= 1000``.
2. IoU of a prediction and a gt instance of the *same* label = shared points /
   (gt points + predicted points - shared points), over all points of the
   mask (void ones included).  A prediction never matches gt of another label.
3. Matching, per scene and class: the counted gt instances in ascending id
   order; for each, the not-yet-taken predictions that touch it, in list
   order.  The first with IoU > th (strictly) matches it and is taken.  A
   further prediction with IoU > th is a false positive whose score is the
   lower of its own and the gt's current score (the gt keeps the higher one);
   it is *not* taken and may still match a later gt.  A counted gt with no
   match is a false negative.
4. Every prediction having IoU > th with *no* same-label gt instance (counted
   or not; whether it was taken is not looked at) is a false positive, unless
   ``ignored / mask_points > th`` where ``ignored`` = its points on void labels
   + its points on same-label gt instances under 100 points (+ its points on
   same-label instances with id < 1000, possible only if label 0 is in
   ``class_ids``; counted twice if such an instance is also small).  Note that the same threshold ``th``
   is used for this share, so at AP25 a prediction is ignored as soon as over
   25% of it is void.  Small gt instances of *other* labels do not count.
5. AP per class and threshold (not VOC AP): scores sorted, each distinct score
   ``s`` is one operating point with precision and recall of the entries
   scored ``>= s`` (recall's denominator includes the false negatives of rule
   3); a point (recall 0, precision 1) is appended; with points ordered by
   ascending score, ``AP = sum_k p_k (r_{k-1} - r_{k+1}) / 2`` where
   ``r_{-1} = r_0`` and ``r_{n+1} = 0``; no precision envelope.
6. A class with no counted gt in any scene is NaN (even with predictions); a
   class with counted gt but no prediction left after rule 1 is 0, and so is
   one whose predictions were all ignored (the official script raises an
   IndexError there).
7. ``ap`` averages the thresholds ``np.arange(0.5, 0.95, 0.05)`` (0.50 ...
   0.90, nine values, no 0.95), ``ap50`` is th = 0.5, ``ap25`` th = 0.25.
   The overall values are means over classes, ignoring NaN classes.
"""
from __future__ import annotations

import numpy as np

__all__ = ["instance_ap", "IOU_THRESHOLDS", "MIN_REGION_SIZE"]

#: the IoU thresholds averaged into ``ap`` (same floats as the official script)
IOU_THRESHOLDS = np.arange(0.5, 0.95, 0.05)
MIN_REGION_SIZE = 100


def _prepare_scene(gt_ids, preds, classes, class_arr, min_region_size):
    """Per class: gt instances [(id, count)] in ascending id and predictions."""
    gt_ids = np.asarray(gt_ids).reshape(-1)
    if gt_ids.size and not np.issubdtype(gt_ids.dtype, np.integer):
        raise TypeError(f"gt ids must be integers, got {gt_ids.dtype}")
    gt_ids = gt_ids.astype(np.int64, copy=False)
    n = gt_ids.size
    uniq, inv, counts = np.unique(gt_ids, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    # void depends on the id only (its label), so it is kept per distinct id
    void_u = (~np.isin(uniq // 1000, class_arr)).astype(np.int64)

    per_class = {c: ([], []) for c in classes}
    gt_slot = {}  # index into uniq -> position in its class's gt list
    for u, (gid, cnt) in enumerate(zip(uniq.tolist(), counts.tolist())):
        if gid == 0:
            continue
        lab = gid // 1000
        if lab in per_class:
            gts = per_class[lab][0]
            gt_slot[u] = len(gts)
            gts.append((gid, cnt))
    slots_by_class = {c: [] for c in classes}
    for u in gt_slot:
        slots_by_class[int(uniq[u] // 1000)].append(u)

    for item in preds:
        if len(item) != 3:
            raise ValueError("each prediction must be (mask, label_id, score)")
        mask, label, score = item
        label = int(label)
        if label not in per_class:
            continue
        mask = np.asarray(mask).reshape(-1)
        if mask.dtype != bool:
            mask = mask != 0
        if mask.size != n:
            raise ValueError(f"prediction mask has {mask.size} points, the scene has {n}")
        count = int(np.count_nonzero(mask))
        if count < min_region_size:
            continue
        inter = np.bincount(inv[mask], minlength=uniq.size)  # shared points per distinct id
        void_inter = int(inter @ void_u)
        touched = []
        for u in slots_by_class[label]:
            k = int(inter[u])
            if k > 0:
                touched.append((gt_slot[u], k))
        per_class[label][1].append((count, float(score), void_inter, touched))
    return per_class


def _scannet_ap(y_true, y_score, hard_false_negatives):
    """ScanNet's AP of scored entries (1 = true positive, 0 = false positive)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    order = np.argsort(y_score, kind="stable")
    s = y_score[order]
    t = y_true[order]
    _, first = np.unique(s, return_index=True)  # ascending distinct scores
    before = np.concatenate([[0.0], np.cumsum(t)])  # true entries before index i
    n = s.size
    num_true = before[-1]
    tp = num_true - before[first]
    fp = (n - first) - tp
    fn = before[first] + hard_false_negatives
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / (tp + fn), 0.0)
    r_prev = np.concatenate([recall[:1], recall[:-1]])
    r_next = np.concatenate([recall[1:], [0.0]])
    return float(np.dot(precision, 0.5 * r_prev - 0.5 * r_next))


def _class_ap(scenes, th, min_region_size):
    """AP of one class at one threshold; ``scenes`` = [(gts, preds), ...]."""
    y_true, y_score = [], []
    hard_fn = 0
    has_gt = has_pred = False
    for gts, preds in scenes:
        counted = [g for g, (gid, cnt) in enumerate(gts) if gid >= 1000 and cnt >= min_region_size]
        has_gt = has_gt or bool(counted)
        has_pred = has_pred or bool(preds)
        by_gt = {g: [] for g in counted}
        for p, (_, _, _, touched) in enumerate(preds):
            for g, k in touched:
                if g in by_gt:
                    by_gt[g].append((p, k))
        taken = [False] * len(preds)
        for g in counted:
            gcount = gts[g][1]
            matched = False
            score = -np.inf
            for p, k in by_gt[g]:
                if taken[p]:
                    continue
                pcount, conf = preds[p][0], preds[p][1]
                if float(k) / (gcount + pcount - k) > th:
                    if matched:
                        y_true.append(0.0)
                        y_score.append(min(score, conf))
                        score = max(score, conf)
                    else:
                        matched = True
                        score = conf
                        taken[p] = True
            if matched:
                y_true.append(1.0)
                y_score.append(score)
            else:
                hard_fn += 1
        for pcount, conf, void_inter, touched in preds:
            if any(float(k) / (gts[g][1] + pcount - k) > th for g, k in touched):
                continue
            ignored = void_inter
            for g, k in touched:
                gid, cnt = gts[g]
                if gid < 1000:
                    ignored += k
                if cnt < min_region_size:
                    ignored += k
            if float(ignored) / pcount <= th:
                y_true.append(0.0)
                y_score.append(conf)
    if not has_gt:
        return float("nan")
    if not has_pred or not y_score:
        return 0.0
    return _scannet_ap(y_true, y_score, hard_fn)


def _nanmean(values):
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def instance_ap(gt, pred, class_ids, *, min_region_size: int = MIN_REGION_SIZE) -> dict:
    """ScanNet instance-segmentation AP (see the module docstring).

    Returns ``{'ap', 'ap50', 'ap25', 'per_class': {label_id: {'ap', 'ap50',
    'ap25'}}}``.
    """
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} gt scenes but {len(pred)} prediction scenes")
    classes = list(dict.fromkeys(int(c) for c in np.asarray(class_ids).reshape(-1).tolist()))
    class_arr = np.asarray(classes, dtype=np.int64)
    prepared = [_prepare_scene(g, p, classes, class_arr, min_region_size) for g, p in zip(gt, pred)]

    overlaps = list(IOU_THRESHOLDS) + [0.25]
    table = np.full((len(classes), len(overlaps)), np.nan)
    for ci, c in enumerate(classes):
        scenes = [scene[c] for scene in prepared]
        for oi, th in enumerate(overlaps):
            table[ci, oi] = _class_ap(scenes, float(th), min_region_size)

    n_main = len(IOU_THRESHOLDS)
    per_class = {}
    for ci, c in enumerate(classes):
        per_class[c] = {
            "ap": float(np.mean(table[ci, :n_main])),
            "ap50": float(table[ci, 0]),
            "ap25": float(table[ci, n_main]),
        }
    return {
        "ap": _nanmean([v["ap"] for v in per_class.values()]),
        "ap50": _nanmean([v["ap50"] for v in per_class.values()]),
        "ap25": _nanmean([v["ap25"] for v in per_class.values()]),
        "per_class": per_class,
    }
