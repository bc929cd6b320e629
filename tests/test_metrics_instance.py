"""ScanNet instance AP against numbers worked out by hand.

ScanNet's AP (rule 5 of harness.metrics.instance): operating points at each
distinct score s (entries scored >= s), then (recall 0, precision 1); with
points in ascending score order AP = sum_k p_k (r_{k-1} - r_{k+1}) / 2,
r_{-1} = r_0, r_{n+1} = 0.  Worked examples used below:

* TP .9, FP .5 -> points (p 1/2, r 1), (p 1, r 1), (1, 0):
  1/2*(1-1)/2 + 1*(1-0)/2 + 1*(1-0)/2 = 1
* FP .9, TP .5 -> (1/2, 1), (0, 0), (1, 0): 1/2*(1-0)/2 + 0 + 1*(0-0)/2 = 1/4
* TP .5, FP .5 (equal scores, one point) -> (1/2, 1), (1, 0):
  1/2*(1-0)/2 + 1*(1-0)/2 = 3/4
"""
import numpy as np
import pytest

from harness.metrics import instance_ap

THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]


class Scene:
    """Builds a gt id array segment by segment, in shuffled point order."""

    def __init__(self, seed=0):
        self.ids = []
        self.rng = np.random.default_rng(seed)

    def add(self, gid, n):
        start = len(self.ids)
        self.ids += [gid] * n
        return np.arange(start, start + n)

    def finish(self):
        n = len(self.ids)
        self.perm = self.rng.permutation(n)  # point i of the build lands at perm[i]
        gt = np.empty(n, dtype=np.int64)
        gt[self.perm] = self.ids
        return gt

    def mask(self, *index_arrays):
        m = np.zeros(len(self.ids), dtype=bool)
        for idx in index_arrays:
            m[self.perm[idx]] = True
        return m


def cls(r, c):
    return r["per_class"][c]


def test_perfect_predictions():
    s = Scene()
    a = s.add(3001, 150)
    b = s.add(3002, 300)
    c = s.add(5001, 200)
    s.add(0, 100)
    gt = s.finish()
    pred = [(s.mask(a), 3, 0.9), (s.mask(b), 3, 0.2), (s.mask(c), 5, 0.5)]
    r = instance_ap([gt], [pred], [3, 5])
    assert r["ap"] == r["ap50"] == r["ap25"] == 1.0
    assert cls(r, 3) == cls(r, 5) == {"ap": 1.0, "ap50": 1.0, "ap25": 1.0}


def test_false_positive_ranked_above_true_positive():
    s = Scene()
    a = s.add(3001, 200)
    b = s.add(4001, 200)  # class 4 is evaluated: a class-3 prediction here is a real FP
    gt = s.finish()
    pred = [(s.mask(b), 3, 0.9), (s.mask(a), 3, 0.5)]
    r = instance_ap([gt], [pred], [3, 4])
    assert cls(r, 3) == pytest.approx({"ap": 0.25, "ap50": 0.25, "ap25": 0.25})
    # class 4 has ground truth and no prediction -> 0, included in the mean
    assert cls(r, 4) == {"ap": 0.0, "ap50": 0.0, "ap25": 0.0}
    assert r["ap"] == pytest.approx(0.125)


def test_true_positive_ranked_above_false_positive():
    s = Scene()
    a = s.add(3001, 200)
    b = s.add(4001, 200)
    gt = s.finish()
    r = instance_ap([gt], [[(s.mask(b), 3, 0.5), (s.mask(a), 3, 0.9)]], [3, 4])
    assert cls(r, 3)["ap"] == pytest.approx(1.0)


def test_equal_scores_form_one_threshold():
    s = Scene()
    a = s.add(3001, 200)
    b = s.add(4001, 200)
    gt = s.finish()
    for order in ([(s.mask(b), 3, 0.5), (s.mask(a), 3, 0.5)], [(s.mask(a), 3, 0.5), (s.mask(b), 3, 0.5)]):
        r = instance_ap([gt], [order], [3, 4])
        assert cls(r, 3)["ap"] == pytest.approx(0.75)


def test_duplicate_detection_gt_keeps_higher_score():
    s = Scene()
    a = s.add(3001, 200)
    gt = s.finish()
    # first in the list matches; the second (IoU 190/200 = .95) is a duplicate.
    # The gt keeps the higher score .8 and the FP gets .6: TP .8, FP .6 -> AP 1
    # (had the FP kept its own .8 above a TP .6, AP would be 1/4).
    pred = [(s.mask(a), 3, 0.6), (s.mask(a[:190]), 3, 0.8)]
    r = instance_ap([gt], [pred], [3])
    assert r["ap"] == pytest.approx(1.0)
    # three copies: TP .8, FP .6, FP .6 -> (1/3, 1), (1, 1), (1, 0): 1/3*0 + 1/2 + 1/2 = 1
    pred.append((s.mask(a[10:]), 3, 0.6))
    assert instance_ap([gt], [pred], [3])["ap"] == pytest.approx(1.0)
    # a duplicate whose score is lower than the matched one: TP .6, FP .4 -> 1
    r = instance_ap([gt], [[(s.mask(a), 3, 0.6), (s.mask(a[:190]), 3, 0.4)]], [3])
    assert r["ap"] == pytest.approx(1.0)


def test_duplicate_stays_free_for_a_later_ground_truth():
    s = Scene()
    a = s.add(3001, 200)
    b = s.add(3002, 200)
    gt = s.finish()
    # P2 covers A and B: IoU 200/400 = .5 with each.
    pred = [(s.mask(a), 3, 0.9), (s.mask(a, b), 3, 0.8)]
    r = instance_ap([gt], [pred], [3])
    # th .25: P2 is a duplicate on A (FP .8, A keeps .9) and still matches B (TP .8):
    #   entries TP .9, FP .8, TP .8; points (2/3, 1), (1, 1/2), (1, 0)
    #   AP = 2/3*(1-1/2)/2 + 1*(1-0)/2 + 1*(1/2-0)/2 = 1/6 + 1/2 + 1/4 = 11/12
    assert r["ap25"] == pytest.approx(11 / 12)
    # th >= .5: IoU .5 is not > .5; P2 is a FP, B a false negative:
    #   TP .9, FP .8, 1 FN; points (1/2, 1/2), (1, 1/2), (1, 0) -> 0 + 1/4 + 1/4
    assert r["ap50"] == pytest.approx(0.5)
    assert r["ap"] == pytest.approx(0.5)


def test_prediction_on_unannotated_points_is_ignored():
    s = Scene()
    a = s.add(3001, 200)
    void0 = s.add(0, 200)      # unannotated (id 0)
    wall = s.add(1001, 200)    # label 1 is not evaluated -> void
    gt = s.finish()
    pred = [(s.mask(void0), 3, 0.9), (s.mask(wall), 3, 0.95), (s.mask(a), 3, 0.5)]
    r = instance_ap([gt], [pred], [3])
    # both high-scored predictions lie entirely on void points: not FPs -> AP 1
    assert r["ap"] == r["ap50"] == r["ap25"] == pytest.approx(1.0)
    # once label 1 is evaluated, the prediction on its points is a real FP (the
    # one on id 0 stays ignored): FP .95 above TP .5 -> 1/4
    r = instance_ap([gt], [pred], [1, 3])
    assert cls(r, 3)["ap"] == pytest.approx(0.25)
    # one prediction over the 200 id-0 and the 200 wall points: void share 200/400 = .5;
    # ignored only where .5 > th: at .25 (AP 1), not at .5 (.5 <= .5) and above (1/4)
    r = instance_ap([gt], [[(~s.mask(a), 3, 0.9), (s.mask(a), 3, 0.5)]], [1, 3])
    assert cls(r, 3)["ap25"] == pytest.approx(1.0)
    assert cls(r, 3)["ap50"] == pytest.approx(0.25)
    assert cls(r, 3)["ap"] == pytest.approx(0.25)


def test_ignored_share_is_compared_with_the_iou_threshold():
    s = Scene()
    a = s.add(3001, 200)
    b = s.add(3002, 300)
    v = s.add(0, 100)
    gt = s.finish()
    # P: 60 void points + 80 points of B (140 points); IoU with B = 80/360 < .25,
    # void share 60/140 = .43: ignored at th .25, a FP at th .5 ... .9
    pred = [(s.mask(v[:60], b[:80]), 3, 0.9), (s.mask(a), 3, 0.5), (s.mask(b), 3, 0.5)]
    r = instance_ap([gt], [pred], [3])
    assert r["ap25"] == pytest.approx(1.0)
    # FP .9, TP .5, TP .5: points (2/3, 1), (0, 0), (1, 0) -> 2/3*(1-0)/2 = 1/3
    assert r["ap50"] == pytest.approx(1 / 3)
    assert r["ap"] == pytest.approx(1 / 3)


def test_small_gt_instances_not_counted_and_count_as_ignored():
    s = Scene()
    a = s.add(3001, 200)
    small = s.add(3003, 99)  # under 100 points: not counted, never a false negative
    c = s.add(4001, 200)
    v = s.add(0, 100)
    gt = s.finish()
    # Q (label 3, 145 points): 45 points of the small class-3 instance, 50 void,
    # 50 of the class-4 instance.  IoU with 3003 = 45/199 < .25.  Ignored share
    # (45 + 50)/145 = .655 > th for th <= .65 (ignored), <= th for .7 ... .9 (FP).
    q = s.mask(small[:45], v[:50], c[:50])
    pred = [(s.mask(a), 3, 0.5), (q, 3, 0.9), (s.mask(c), 4, 0.7)]
    r = instance_ap([gt], [pred], [3, 4])
    per_th = [1.0] * 4 + [0.25] * 5  # .5 .55 .6 .65 ignored; .7 ... .9 FP above TP
    assert cls(r, 3)["ap"] == pytest.approx(np.mean(per_th))
    assert cls(r, 3)["ap50"] == pytest.approx(1.0)
    assert cls(r, 3)["ap25"] == pytest.approx(1.0)
    assert cls(r, 4) == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap25": 1.0})
    assert r["ap"] == pytest.approx((np.mean(per_th) + 1.0) / 2)


def test_class_with_only_small_gt_is_nan_and_small_predictions_dropped():
    s = Scene()
    small = s.add(3001, 99)
    big = s.add(4001, 150)
    gt = s.finish()
    # the class-3 prediction is fine but class 3 has no counted gt -> NaN;
    # the 99-point class-4 prediction is dropped -> class 4 has gt, no prediction -> 0
    pred = [(s.mask(small), 3, 0.9), (s.mask(big[:99]), 4, 0.9)]
    r = instance_ap([gt], [pred], [3, 4])
    assert all(np.isnan(v) for v in cls(r, 3).values())
    assert cls(r, 4) == {"ap": 0.0, "ap50": 0.0, "ap25": 0.0}
    assert r["ap"] == 0.0  # the NaN class is left out of the mean
    # a 100-point prediction is kept
    r = instance_ap([gt], [[(s.mask(big[:100]), 4, 0.9)]], [3, 4])
    assert cls(r, 4)["ap50"] == pytest.approx(1.0)  # IoU 100/150 = .667
    assert cls(r, 4)["ap"] == pytest.approx(4 / 9)  # matched at .5 .55 .6 .65 only


def test_class_without_gt_is_nan_and_excluded():
    s = Scene()
    a = s.add(3001, 200)
    b = s.add(1001, 200)
    gt = s.finish()
    pred = [(s.mask(a), 3, 0.9), (s.mask(b), 5, 0.9)]
    r = instance_ap([gt], [pred], [3, 5])
    assert all(np.isnan(v) for v in cls(r, 5).values())
    assert r["ap"] == r["ap50"] == r["ap25"] == 1.0


def test_empty_predictions():
    s = Scene()
    s.add(3001, 200)
    gt = s.finish()
    r = instance_ap([gt], [[]], [3, 4])
    assert cls(r, 3) == {"ap": 0.0, "ap50": 0.0, "ap25": 0.0}
    assert np.isnan(cls(r, 4)["ap"])
    assert r["ap"] == 0.0
    r = instance_ap([np.zeros(10, dtype=np.int64)], [[]], [3])
    assert np.isnan(r["ap"]) and np.isnan(r["ap50"]) and np.isnan(r["ap25"])


def test_all_predictions_ignored_gives_zero():
    # the official script raises an IndexError here
    s = Scene()
    s.add(3001, 200)
    v = s.add(0, 200)
    gt = s.finish()
    r = instance_ap([gt], [[(s.mask(v), 3, 0.9)]], [3])
    assert cls(r, 3) == {"ap": 0.0, "ap50": 0.0, "ap25": 0.0}


def test_prediction_matches_only_gt_of_its_own_label():
    s = Scene()
    a = s.add(3001, 200)
    b = s.add(4001, 200)
    gt = s.finish()
    # exact mask of the class-3 instance but labelled 4: FN for 3, FP for 4
    pred = [(s.mask(a), 4, 0.9), (s.mask(b), 4, 0.5)]
    r = instance_ap([gt], [pred], [3, 4])
    assert cls(r, 3)["ap"] == 0.0
    assert cls(r, 4)["ap"] == pytest.approx(0.25)
    # a label outside class_ids is dropped entirely
    r = instance_ap([gt], [[(s.mask(b), 7, 0.9), (s.mask(b), 4, 0.5)]], [3, 4])
    assert cls(r, 4)["ap"] == pytest.approx(1.0)


def test_iou_must_exceed_threshold_strictly():
    s = Scene()
    a = s.add(3001, 200)
    gt = s.finish()
    # IoU exactly 100/200 = .5: no match at .5, a match at .25; the unmatched
    # prediction is a FP (share of ignored points 0)
    r = instance_ap([gt], [[(s.mask(a[:100]), 3, 0.9)]], [3])
    assert r["ap50"] == 0.0
    assert r["ap25"] == pytest.approx(1.0)
    assert r["ap"] == 0.0


def test_several_scenes_pool_their_predictions():
    s1, s2 = Scene(1), Scene(2)
    a1 = s1.add(3001, 200)
    g1 = s1.finish()
    a2 = s2.add(3001, 150)
    b2 = s2.add(4001, 150)
    g2 = s2.finish()
    # scene 1: TP .5; scene 2: FP .9 on class 4 points and the class-3 instance missed
    # entries FP .9, TP .5, 1 FN: points (1/2, 1/2), (0, 0), (1, 0) -> 1/2*(1/2)/2 = 1/8
    r = instance_ap([g1, g2], [[(s1.mask(a1), 3, 0.5)], [(s2.mask(b2), 3, 0.9)]], [3, 4])
    assert cls(r, 3)["ap"] == pytest.approx(1 / 8)


def test_brute_force_single_threshold_without_ties():
    """Independent simple evaluator for the no-duplicate case, random scenes."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = Scene(int(rng.integers(1000)))
        insts = [s.add(3000 + i + 1, int(rng.integers(120, 300))) for i in range(4)]
        gt = s.finish()
        pred, truth = [], []
        for i, idx in enumerate(insts):
            keep = idx[: int(len(idx) * rng.uniform(0.3, 1.0))]
            sc = float(rng.random())
            pred.append((s.mask(keep), 3, sc))
            if len(keep) >= 100:  # smaller predictions are dropped
                truth.append((len(keep) / len(idx), sc))  # inside its gt: IoU = share kept
        r = instance_ap([gt], [pred], [3])
        for th, key in ((0.5, "ap50"), (0.25, "ap25")):
            # walk the ranked list by descending score
            ranked = sorted(truth, key=lambda t: -t[1])
            tps = np.cumsum([iou > th for iou, _ in ranked])
            n = len(ranked)
            prec = [tps[k] / (k + 1) for k in range(n)]
            rec = [tps[k] / len(insts) for k in range(n)]
            # ScanNet order: ascending score, plus (r 0, p 1)
            p = prec[::-1] + [1.0]
            rr = rec[::-1] + [0.0]
            ap = sum(p[k] * ((rr[k - 1] if k else rr[0]) - (rr[k + 1] if k + 1 < len(rr) else 0.0)) / 2
                     for k in range(len(p)))
            # predictions that fail the threshold are FPs here (nothing is void)
            assert r[key] == pytest.approx(ap)
