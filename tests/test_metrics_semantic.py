"""Semantic mIoU against confusion matrices worked out by hand."""
import numpy as np
import pytest

from harness.metrics import confusion_matrix, iou_from_confusion, semantic_iou


def test_hand_confusion_with_ignore_and_absent_class():
    # points (gt, pred); the last point is ignored, so its prediction 2 is not a FP
    gt = np.array([0, 0, 1, 1, 2, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 2, 2])
    cm = confusion_matrix(pred, gt, 4, 255)
    expected = np.zeros((4, 5), dtype=np.int64)
    expected[0, 0] = 1  # gt 0 -> 0
    expected[0, 1] = 1  # gt 0 -> 1
    expected[1, 1] = 2  # gt 1 -> 1
    expected[2, 0] = 1  # gt 2 -> 0
    expected[2, 2] = 1  # gt 2 -> 2
    np.testing.assert_array_equal(cm, expected)

    r = semantic_iou(pred, gt, 4, 255)
    # class 0: TP 1, FP 1 (gt 2), FN 1 (-> 1): 1/3
    # class 1: TP 2, FP 1 (gt 0), FN 0:         2/3
    # class 2: TP 1, FP 0, FN 1:                1/2
    # class 3: absent from gt and pred:         NaN
    np.testing.assert_allclose(r["per_class"][:3], [1 / 3, 2 / 3, 1 / 2])
    assert np.isnan(r["per_class"][3])
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["miou"] == pytest.approx(0.5)


def test_prediction_out_of_range_is_fn_but_no_fp():
    gt = np.array([0, 0, 1])
    pred = np.array([0, -1, 7])
    cm = confusion_matrix(pred, gt, 2, ignore_index=255)
    np.testing.assert_array_equal(cm, [[1, 0, 1], [0, 0, 1]])
    r = semantic_iou(pred, gt, 2, 255)
    # class 0: TP 1, FN 1 -> 1/2 ; class 1: TP 0, FN 1 -> 0
    np.testing.assert_allclose(r["per_class"], [0.5, 0.0])
    assert r["miou"] == pytest.approx(0.25)


def test_class_only_predicted_is_zero_not_nan():
    r = semantic_iou(np.array([0, 1]), np.array([0, 0]), 2, -1)
    np.testing.assert_allclose(r["per_class"], [0.5, 0.0])
    assert r["miou"] == pytest.approx(0.25)


def test_prediction_at_ignored_point_only_gives_nan():
    # class 1 is predicted only at an ignored point: absent -> NaN, not 0
    r = semantic_iou(np.array([0, 1]), np.array([0, -1]), 2, -1)
    assert r["per_class"][0] == 1.0
    assert np.isnan(r["per_class"][1])
    assert r["miou"] == 1.0


def test_all_ignored_is_nan():
    r = semantic_iou(np.array([0, 1]), np.array([-1, -1]), 2, -1)
    assert np.all(np.isnan(r["per_class"]))
    assert np.isnan(r["miou"])


def test_accumulation_over_scenes_and_square_matrix():
    rng = np.random.default_rng(0)
    g1, p1 = rng.integers(0, 4, 500), rng.integers(-1, 5, 500)
    g2, p2 = rng.integers(0, 4, 300), rng.integers(-1, 5, 300)
    cm = confusion_matrix(p1, g1, 4, 3) + confusion_matrix(p2, g2, 4, 3)
    whole = semantic_iou(np.r_[p1, p2], np.r_[g1, g2], 4, 3)
    acc = iou_from_confusion(cm)
    np.testing.assert_allclose(acc["per_class"], whole["per_class"])
    assert acc["miou"] == pytest.approx(whole["miou"])
    # a plain square matrix (all predictions in range) is accepted too
    sq = iou_from_confusion(np.array([[2, 1], [0, 3]]))
    np.testing.assert_allclose(sq["per_class"], [2 / 3, 3 / 4])


def test_against_brute_force_per_point_counting():
    rng = np.random.default_rng(1)
    n, c, ign = 2000, 5, 255
    gt = rng.integers(0, c, n)
    gt[rng.random(n) < 0.1] = ign
    pred = rng.integers(-1, c + 1, n)
    r = semantic_iou(pred, gt, c, ign)
    for k in range(c):
        tp = fp = fn = 0
        for g, p in zip(gt, pred):
            if g == ign:
                continue
            tp += g == k and p == k
            fp += g != k and p == k
            fn += g == k and p != k
        assert r["per_class"][k] == pytest.approx(tp / (tp + fp + fn))


def test_bad_gt_label_raises():
    with pytest.raises(ValueError):
        semantic_iou(np.array([0, 1]), np.array([0, 5]), 2, -1)
    with pytest.raises(ValueError):
        semantic_iou(np.array([0, 1, 1]), np.array([0, 1]), 2, -1)


def test_many_points_is_fast():
    import time

    rng = np.random.default_rng(2)
    gt = rng.integers(0, 21, 2_000_000)
    pred = rng.integers(0, 20, 2_000_000)
    t = time.perf_counter()
    confusion_matrix(pred, gt, 20, 20)
    assert time.perf_counter() - t < 2.0


def test_metrics_package_is_pure_numpy():
    import subprocess
    import sys

    code = "import sys, harness.metrics as m; assert 'torch' not in sys.modules; print(m.__all__)"
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    for name in ("semantic_iou", "instance_ap", "detection_ap", "box3d_iou"):
        assert name in out.stdout


def test_absent_class_scores_zero_in_the_semantickitti_convention():
    # semantic-kitti-api np_ioueval on ids gt = pred = [1, 1, 2] with class 0 ignored and
    # classes 1..3 evaluated: IoU = tp / (tp + fp + fn + 1e-15) = [1, 1, 0], mean 2/3 (class 3
    # absent from both); the ScanNet convention leaves class 3 out: mean 1
    gt = pred = np.array([0, 0, 1])
    kitti = semantic_iou(pred, gt, 3, -100, absent="zero")
    np.testing.assert_array_equal(kitti["per_class"], [1.0, 1.0, 0.0])
    assert kitti["miou"] == pytest.approx(2 / 3)
    scannet = semantic_iou(pred, gt, 3, -100)
    assert np.isnan(scannet["per_class"][2]) and scannet["miou"] == 1.0
    # classes that are present score alike in both conventions
    gt, pred = np.array([0, 0, 1, 1, 2, 2, 255]), np.array([0, 1, 1, 1, 0, 2, 2])
    a, b = semantic_iou(pred, gt, 4, 255, absent="zero"), semantic_iou(pred, gt, 4, 255)
    np.testing.assert_allclose(a["per_class"][:3], b["per_class"][:3])
    assert a["per_class"][3] == 0.0 and a["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 4)
    with pytest.raises(ValueError, match="absent must be one of"):
        iou_from_confusion(np.eye(2), absent="skip")


def test_semseg_evaluation_follows_the_dataset_convention():
    """The task scores with its dataset's official convention: SemanticKITTI's evaluator counts
    a class the split lacks as 0, ScanNet's leaves it out."""
    import torch

    from harness.data.scannet import ScanNet
    from harness.data.semantickitti import SemanticKITTI
    from harness.tasks.semseg import SemanticSegmentation, SemSegConfig

    class Backbone(torch.nn.Module):  # predicts class 0 at the first voxel, class 1 at the second
        def forward(self, coords, feats):
            return torch.tensor([[9.0, 0, 0], [0, 9.0, 0]])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()

    class Data:
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return 1

        def sample(self, i):
            return {"coords": np.zeros((2, 3), np.int32), "feats": np.zeros((2, 3), np.float32),
                    "semantic": np.array([0, 1])}

    for reader, expected in ((SemanticKITTI, 2 / 3), (ScanNet, 1.0)):
        ds = type("Three", (), {"num_classes": 3, "ignore_index": -100,
                                "absent_class_iou": reader.absent_class_iou})()
        task = SemanticSegmentation(SemSegConfig(evaluate_on="voxels"))
        assert task.evaluate(Model(), Data(ds), torch.device("cpu"))["miou"] == pytest.approx(expected)
