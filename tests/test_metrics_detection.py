"""Oriented 3D box IoU and VoteNet detection AP against hand-worked numbers.

VOC AP used below (area under the precision envelope), by hand:
* FP .9 then TP .5, one gt: recall [0, 1], precision [0, 1/2] -> envelope 1/2
  over recall 0..1 -> AP 1/2.
* TP .9, duplicate .8, TP .7 on 2 gt: recall [1/2, 1/2, 1],
  precision [1, 1/2, 2/3] -> 1/2 * 1 + 1/2 * 2/3 = 5/6.
"""
import math

import numpy as np
import pytest

from harness.metrics import box3d_iou, box_corners_bev, detection_ap

SQ2 = math.sqrt(2.0)


def box(cx=0.0, cy=0.0, cz=0.0, dx=2.0, dy=2.0, dz=2.0, h=0.0):
    return np.array([cx, cy, cz, dx, dy, dz, h], dtype=float)


# ---------------------------------------------------------------- box IoU

def test_identical_boxes():
    for h in (0.0, 0.3, math.pi / 4, math.pi / 2, -2.0):
        b = box(1, -2, 0.5, 3, 1, 2, h)
        assert box3d_iou(b, b) == pytest.approx(1.0)


def test_square_rotated_45_degrees():
    # square side 2 and the same square turned 45 degrees: a regular octagon,
    # 4 - 4 corner triangles of legs (2 - sqrt2): 4 - 2 (2 - sqrt2)^2 = 8 sqrt2 - 8
    inter = 8 * SQ2 - 8
    expected = inter / (8 - inter)  # = 1 / sqrt2 (heights equal)
    assert expected == pytest.approx(1 / SQ2)
    assert box3d_iou(box(), box(h=math.pi / 4)) == pytest.approx(expected, abs=1e-12)
    assert box3d_iou(box(h=0.2), box(h=0.2 + math.pi / 4)) == pytest.approx(expected, abs=1e-12)


def test_rectangle_rotated_90_degrees():
    # 2 x 1 vs the same turned 90 degrees: BEV overlap 1 x 1 = 1; 1 / (2 + 2 - 1)
    assert box3d_iou(box(dx=2, dy=1), box(dx=2, dy=1, h=math.pi / 2)) == pytest.approx(1 / 3)
    # ... which is the same box as dx=1, dy=2 unrotated: IoU 1
    assert box3d_iou(box(dx=1, dy=2), box(dx=2, dy=1, h=math.pi / 2)) == pytest.approx(1.0)
    # heading and heading + pi describe the same box
    assert box3d_iou(box(dx=3, dy=1, h=0.4), box(dx=3, dy=1, h=0.4 + math.pi)) == pytest.approx(1.0)


def test_diamond_on_the_edge_of_a_square():
    # diamond: square of side sqrt2 turned 45 deg, centred at (1, 0): vertices
    # (0,0) (1,1) (2,0) (1,-1); its left half (area 1) lies in the square [-1,1]^2
    # areas 4 and 2, same heights -> 1 / (4 + 2 - 1)
    d = box(1, 0, 0, SQ2, SQ2, 2, math.pi / 4)
    assert box3d_iou(box(), d) == pytest.approx(1 / 5)


def test_shared_face_edge_and_corner_give_zero():
    a = box()
    assert box3d_iou(a, box(cx=2)) == 0.0                   # shared face x = 1
    assert box3d_iou(a, box(cz=2)) == 0.0                   # shared top face
    assert box3d_iou(a, box(cx=2, cy=2)) == 0.0             # shared vertical edge
    assert box3d_iou(a, box(cx=2, cy=2, cz=2)) == 0.0       # shared corner
    # rotated boxes touching along a face: neighbours along the box's own x axis
    h = 0.7
    n = box(cx=2 * math.cos(h), cy=2 * math.sin(h), h=h)
    assert box3d_iou(box(h=h), n) == pytest.approx(0.0, abs=1e-12)
    assert box3d_iou(box(h=math.pi / 2), box(cx=2, h=math.pi / 2)) == pytest.approx(0.0, abs=1e-12)
    # a diamond touching the square at one corner only
    assert box3d_iou(a, box(1 + SQ2 / 2, 0, 0, 1, 1, 2, math.pi / 4)) == pytest.approx(0.0, abs=1e-12)


def test_sharing_a_face_with_partial_overlap_elsewhere():
    # same x range, one box on top of the other half-way in y: overlap 2 x 1 x 2 = 4
    assert box3d_iou(box(), box(cy=1)) == pytest.approx(4 / (8 + 8 - 4))
    # axis-aligned diagonal shift: 1 x 1 x 2 = 2 -> 2 / 14
    assert box3d_iou(box(), box(cx=1, cy=1)) == pytest.approx(1 / 7)
    # inner box flush with two faces of the outer one: 1 / 8
    assert box3d_iou(box(), box(0.5, 0.5, 0.5, 1, 1, 1)) == pytest.approx(1 / 8)


def test_coinciding_edges_where_votenets_clipping_errs():
    # x ranges [-0.5, -0.3] and [-0.6, -0.4], y and z equal: overlap 0.1 of a union of 0.3
    # (VoteNet's box3d_iou gives 0.6 here, found by comparing the two on random boxes)
    a = np.array([-0.4, 0.7, -0.8, 0.2, 0.8, 0.9, 0.0])
    b = np.array([-0.5, 0.7, -0.8, 0.2, 0.8, 0.9, 0.0])
    assert box3d_iou(a, b) == pytest.approx(1 / 3)
    c = np.array([0.0, 0.2, 0.0, 0.3, 0.7, 1.0, 0.0])  # VoteNet: 4.37 against itself
    assert box3d_iou(c, c) == pytest.approx(1.0)


def test_disjoint_boxes():
    assert box3d_iou(box(), box(cx=5)) == 0.0
    assert box3d_iou(box(), box(cz=3)) == 0.0  # same footprint, above
    assert box3d_iou(box(h=0.3), box(cx=3, cy=0.1, h=1.1)) == pytest.approx(0.0, abs=1e-12)


def test_vertical_partial_overlap():
    # same footprint 2x2, heights 2, offset 0.5 vertically: 4 * 1.5 = 6; 6 / (8 + 8 - 6)
    assert box3d_iou(box(), box(cz=0.5)) == pytest.approx(0.6)
    # rotated footprints and vertical overlap combine: (1/sqrt2 case) octagon x 1
    inter = (8 * SQ2 - 8) * 1.0
    assert box3d_iou(box(), box(cz=1.0, h=math.pi / 4)) == pytest.approx(inter / (16 - inter))


def test_matrix_shapes_and_symmetry():
    rng = np.random.default_rng(0)
    a = np.c_[rng.uniform(-2, 2, (5, 3)), rng.uniform(0.5, 2, (5, 3)), rng.uniform(-3, 3, 5)]
    b = np.c_[rng.uniform(-2, 2, (7, 3)), rng.uniform(0.5, 2, (7, 3)), rng.uniform(-3, 3, 7)]
    m = box3d_iou(a, b)
    assert m.shape == (5, 7)
    np.testing.assert_allclose(m, box3d_iou(b, a).T, atol=1e-12)
    assert m[2, 3] == pytest.approx(box3d_iou(a[2], b[3]))
    assert isinstance(box3d_iou(a[0], b[0]), float)
    assert box3d_iou(a, np.zeros((0, 7))).shape == (5, 0)
    assert np.all((m >= 0) & (m <= 1))


def test_corners_follow_the_heading_convention():
    # heading turns the box's x axis counter-clockwise about +z
    h = 0.3
    c = box_corners_bev(box(1, 2, 0, 4, 2, 1, h))
    assert c.shape == (4, 2)
    # the +x face centre is centre + dx/2 (cos h, sin h)
    face = c[1:3].mean(axis=0)
    np.testing.assert_allclose(face, [1 + 2 * math.cos(h), 2 + 2 * math.sin(h)])
    # counter-clockwise order: positive shoelace area = dx * dy
    x, y = c[:, 0], c[:, 1]
    assert 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) == pytest.approx(8.0)
    # 90 degrees: dx runs along y
    c = box_corners_bev(box(0, 0, 0, 4, 2, 1, math.pi / 2))
    assert sorted(map(tuple, np.round(c, 12))) == [(-1, -2), (-1, 2), (1, -2), (1, 2)]
    # a long thin box turned +45 deg covers (1, 1), not (1, -1)
    thin = box(0, 0, 0, 4, 0.2, 2, math.pi / 4)
    probe = box(1, 1, 0, 0.2, 0.2, 2)
    assert box3d_iou(thin, probe) > 0
    assert box3d_iou(thin, box(1, -1, 0, 0.2, 0.2, 2)) == 0.0


def _grid_iou(a, b, n=500):
    """Independent estimate: BEV grid sampling x exact vertical overlap."""
    def inside(px, py, bx):
        c, s = math.cos(bx[6]), math.sin(bx[6])
        u = (px - bx[0]) * c + (py - bx[1]) * s
        v = -(px - bx[0]) * s + (py - bx[1]) * c
        return (np.abs(u) <= bx[3] / 2) & (np.abs(v) <= bx[4] / 2)

    r = max(np.hypot(a[3], a[4]), np.hypot(b[3], b[4]))
    lo_x, hi_x = min(a[0], b[0]) - r, max(a[0], b[0]) + r
    lo_y, hi_y = min(a[1], b[1]) - r, max(a[1], b[1]) + r
    xs = lo_x + (np.arange(n) + 0.5) * (hi_x - lo_x) / n
    ys = lo_y + (np.arange(n) + 0.5) * (hi_y - lo_y) / n
    px, py = np.meshgrid(xs, ys)
    cell = (hi_x - lo_x) * (hi_y - lo_y) / n**2
    area = np.count_nonzero(inside(px, py, a) & inside(px, py, b)) * cell
    h = max(0.0, min(a[2] + a[5] / 2, b[2] + b[5] / 2) - max(a[2] - a[5] / 2, b[2] - b[5] / 2))
    inter = area * h
    return inter / (a[3] * a[4] * a[5] + b[3] * b[4] * b[5] - inter)


def test_random_pairs_against_grid_sampling():
    rng = np.random.default_rng(3)
    checked = 0
    while checked < 15:
        a = np.r_[rng.uniform(-0.5, 0.5, 3), rng.uniform(0.5, 2, 3), rng.uniform(-np.pi, np.pi)]
        b = np.r_[rng.uniform(-0.5, 0.5, 3), rng.uniform(0.5, 2, 3), rng.uniform(-np.pi, np.pi)]
        exact = box3d_iou(a, b)
        if exact == 0:
            continue
        assert exact == pytest.approx(_grid_iou(a, b), abs=0.01)
        checked += 1


def test_many_boxes_are_fast():
    import time

    rng = np.random.default_rng(4)
    a = np.c_[rng.uniform(0, 10, (400, 3)), rng.uniform(0.3, 2, (400, 3)), rng.uniform(-3, 3, 400)]
    t = time.perf_counter()
    box3d_iou(a, a)
    assert time.perf_counter() - t < 5.0


# ---------------------------------------------------------------- detection AP

def scene(gt_boxes, gt_labels, pred_boxes, pred_labels, scores):
    g = (np.array(gt_boxes, dtype=float).reshape(-1, 7), np.array(gt_labels, dtype=int))
    p = (np.array(pred_boxes, dtype=float).reshape(-1, 7), np.array(pred_labels, dtype=int),
         np.array(scores, dtype=float))
    return g, p


def test_perfect_detections():
    gb = [box(0, 0, h=0.3), box(5, 0, h=1.2), box(0, 5, dx=1, dy=3)]
    g, p = scene(gb, [1, 1, 2], gb, [1, 1, 2], [0.9, 0.3, 0.5])
    r = detection_ap([g], [p], [1, 2])
    assert r["map"] == 1.0
    assert r["per_class"] == {1: 1.0, 2: 1.0}


def test_false_positive_ranked_above_true_positive():
    g, p = scene([box()], [1], [box(cx=10), box()], [1, 1], [0.9, 0.5])
    assert detection_ap([g], [p], [1])["per_class"][1] == pytest.approx(0.5)
    g, p = scene([box()], [1], [box(cx=10), box()], [1, 1], [0.5, 0.9])
    assert detection_ap([g], [p], [1])["per_class"][1] == pytest.approx(1.0)


def test_duplicate_detections():
    gb = [box(), box(cx=5)]
    g, p = scene(gb, [1, 1], [box(), box(cz=0.1), box(cx=5)], [1, 1, 1], [0.9, 0.8, 0.7])
    assert detection_ap([g], [p], [1])["map"] == pytest.approx(5 / 6)


def test_compared_with_best_gt_even_if_already_matched():
    # unit-section boxes along x: gt1 x in [0, 2], gt2 x in [1, 3]
    def xbox(lo, hi):
        return box(cx=(lo + hi) / 2, dx=hi - lo, dy=1, dz=1)

    gb = [xbox(0, 2), xbox(1, 3)]
    # B = [0.5, 2.3]: IoU 1.5/2.3 = .65 with gt1 (matched already), 1.3/2.5 = .52 with gt2.
    # B goes to gt1 and is a FP; gt2 stays unmatched: recall [1/2, 1/2],
    # precision [1, 1/2] -> AP 1/2 (it would be 1 if B could fall back to gt2)
    g, p = scene(gb, [1, 1], [xbox(0, 2), xbox(0.5, 2.3)], [1, 1], [0.9, 0.8])
    assert detection_ap([g], [p], [1], iou_threshold=0.5)["map"] == pytest.approx(0.5)


def test_iou_threshold_is_strict():
    g, p = scene([box(dx=2)], [1], [box(cx=-0.5, dx=1)], [1], [0.9])  # IoU exactly 1/2
    assert detection_ap([g], [p], [1], iou_threshold=0.5)["map"] == 0.0
    assert detection_ap([g], [p], [1], iou_threshold=0.25)["map"] == 1.0


def test_class_without_gt_is_nan_and_class_without_predictions_is_zero():
    g, p = scene([box(), box(cx=5)], [1, 2], [box(), box(cx=9)], [1, 3], [0.9, 0.9])
    r = detection_ap([g], [p], [1, 2, 3, 4])
    assert r["per_class"][1] == 1.0
    assert r["per_class"][2] == 0.0         # gt, no prediction
    assert np.isnan(r["per_class"][3])      # predictions, no gt
    assert np.isnan(r["per_class"][4])      # nothing at all
    assert r["map"] == pytest.approx(0.5)   # mean of classes 1 and 2


def test_predictions_pooled_over_scenes():
    # scene 0: one gt, found with .5; scene 1: no gt of the class, a FP with .9
    g0, p0 = scene([box()], [1], [box()], [1], [0.5])
    g1, p1 = scene([box()], [2], [box()], [1], [0.9])
    r = detection_ap([g0, g1], [p0, p1], [1, 2])
    assert r["per_class"][1] == pytest.approx(0.5)
    assert r["per_class"][2] == 0.0


def test_rotated_and_partially_overlapping_detections():
    # gt rotated 45 deg; a prediction with the same square unrotated has IoU 1/sqrt2:
    # a TP at .5, a FP at .75
    g, p = scene([box(h=math.pi / 4)], [1], [box()], [1], [0.7])
    assert detection_ap([g], [p], [1], 0.5)["map"] == 1.0
    assert detection_ap([g], [p], [1], 0.75)["map"] == 0.0


def test_empty_inputs():
    g, p = scene([], [], [], [], [])
    r = detection_ap([g], [p], [1])
    assert np.isnan(r["map"]) and np.isnan(r["per_class"][1])
    g, p = scene([box()], [1], [], [], [])
    assert detection_ap([g], [p], [1])["map"] == 0.0


def test_voc_ap_against_independent_walk():
    """Ranked TP/FP list -> all-point VOC AP computed by a plain loop."""
    rng = np.random.default_rng(5)
    gb = [box(cx=4 * i) for i in range(6)]
    preds, scores, is_tp = [], [], []
    for i in range(6):
        if rng.random() < 0.8:
            preds.append(box(cx=4 * i + 0.1))  # IoU 1.9/2.1 > .5
            is_tp.append(True)
            scores.append(rng.random())
    for _ in range(4):
        preds.append(box(cx=4 * rng.integers(6) + 1.5))  # IoU .5/3.5 < .5
        is_tp.append(False)
        scores.append(rng.random())
    g, p = scene(gb, [1] * 6, preds, [1] * len(preds), scores)
    ranked = [t for _, t in sorted(zip(scores, is_tp), key=lambda x: -x[0])]
    tp = np.cumsum(ranked)
    prec = tp / np.arange(1, len(ranked) + 1)
    rec = tp / 6
    ap, prev_r = 0.0, 0.0
    for k in range(len(ranked)):
        if rec[k] > prev_r:
            ap += (rec[k] - prev_r) * prec[k:].max()
            prev_r = rec[k]
    assert detection_ap([g], [p], [1])["map"] == pytest.approx(ap)
