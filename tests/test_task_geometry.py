"""Building blocks of the instance-segmentation and detection tasks, on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.tasks.common import points_in_boxes, transform_boxes
from harness.tasks.detection import (ball_query, decode_heading, decode_size, encode_heading, encode_size,
                                     furthest_point_sample, nms_3d, postprocess, vote_targets)
from harness.tasks.instseg import gt_instance_ids, group_proposals, instance_mask, offset_losses


# -- instance segmentation ---------------------------------------------------------------------

def test_grouping_of_hand_placed_points():
    # class 2: a chain 0-1-2 (steps 0.04 < r = 0.05), and a separate pair 3-4 one metre away;
    # class 3: points 5-7 on top of the chain (same place, other class: never merged with it);
    # class 2 point 8 alone (below min_points); class 4 (not a thing class) point 9 next to the chain.
    pts = np.array([[0, 0, 0], [0.04, 0, 0], [0.08, 0, 0],
                    [1, 0, 0], [1, 0.03, 0],
                    [0, 0, 0], [0.04, 0, 0], [0.045, 0.01, 0],
                    [5, 5, 5], [0.02, 0, 0]], dtype=np.float64)
    labels = np.array([2, 2, 2, 2, 2, 3, 3, 3, 2, 4])
    scores = np.array([0.9, 0.6, 0.6, 0.5, 0.7, 0.3, 0.6, 0.9, 1.0, 1.0])
    props = group_proposals(pts, labels, scores, classes=[2, 3], radius=0.05, min_points=2)
    got = sorted((sorted(m.tolist()), c, round(s, 6)) for m, c, s in props)
    assert got == [([0, 1, 2], 2, 0.7), ([3, 4], 2, 0.6), ([5, 6, 7], 3, 0.6)]
    # a radius below the chain's step splits it into singletons, all dropped by min_points=2
    props = group_proposals(pts, labels, scores, classes=[2], radius=0.035, min_points=2)
    assert sorted(sorted(m.tolist()) for m, _, _ in props) == [[3, 4]]


def test_gt_instance_ids_follow_scannet_encoding():
    instance = np.array([0, 1, 1, 2, 3, 3])
    instance_label = np.array([-100, 4, 0, -100])  # id 2 is a wall (train id 0), id 3 unlabelled
    assert gt_instance_ids(instance, instance_label).tolist() == [0, 5001, 5001, 1002, 0, 0]


def test_offset_losses_by_hand():
    pred = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [5.0, 5.0, 5.0]])
    target = torch.tensor([[2.0, 0, 0], [0, 0, 1.0], [0, 0, 0]])
    mask = torch.tensor([True, True, False])
    l1, direction = offset_losses(pred, target, mask)
    # L1: |1-2| = 1 and |0|+|2|+|1| = 3 -> mean 2; cosines: 1 and 0 -> -(1 + 0) / 2
    assert l1.item() == pytest.approx(2.0, abs=1e-5)
    assert direction.item() == pytest.approx(-0.5, abs=1e-5)


def test_instance_mask_keeps_thing_instances():
    thing = torch.tensor([False, False, True, True])
    cls = torch.tensor([-100, 0, 2, 3, 1])
    assert instance_mask(cls, thing).tolist() == [False, False, True, True, False]


# -- sampling and grouping in PyTorch ----------------------------------------------------------

def test_fps_picks_the_farthest_points():
    line = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [10, 0, 0]]])
    # from index 0: farthest is 10 (index 3); then 2 (distance 2 to {0, 10}) beats 1 (distance 1)
    assert furthest_point_sample(line, 3).tolist() == [[0, 3, 2]]
    square = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0], [3, 0, 0], [3, 4, 0], [0, 4, 0], [100, 100, 100]]])
    valid = torch.tensor([[True, True, True, True, True, False]])  # the far point is padding
    # from (0,0): (3,4) at 5; then (3,0) and (0,4) are both 3 from {(0,0), (3,4)}: the lower index
    # first, then (0,4); the padding point is never taken
    assert furthest_point_sample(square, 4, valid).tolist() == [[0, 3, 2, 4]]
    # once the valid points are used up, index 0 repeats
    assert furthest_point_sample(square, 7, valid).tolist() == [[0, 3, 2, 4, 1, 0, 0]]
    # a batch of two scenes (the second with fewer valid points) gives each scene's own picks
    other = torch.tensor([[[0.0, 0, 0], [0, 0, 2], [0, 0, 1], [9, 9, 9], [9, 9, 9], [9, 9, 9]]])
    both = torch.cat([square, other])
    vb = torch.cat([valid, torch.tensor([[True, True, True, False, False, False]])])
    assert furthest_point_sample(both, 3, vb).tolist() == [[0, 3, 2], [0, 1, 2]]


def test_ball_query_takes_first_points_in_index_order():
    xyz = torch.tensor([[[0.0, 0, 0], [5, 0, 0], [0.1, 0, 0], [0.2, 0, 0], [0.25, 0, 0]]])
    centres = torch.tensor([[[0.0, 0, 0], [5.05, 0, 0], [9.0, 0, 0]]])
    idx = ball_query(xyz, centres, radius=0.22, nsample=3)
    # centre 0: points 0, 2, 3 (4 is at 0.25); centre 1: point 1 only, padded with itself;
    # centre 2: nothing in range -> index 0
    assert idx.tolist() == [[[0, 2, 3], [1, 1, 1], [0, 0, 0]]]


# -- boxes ---------------------------------------------------------------------------------------

def test_nms_on_hand_made_boxes():
    boxes = np.array([
        [0, 0, 0, 1, 1, 1, 0],      # A, 0.9
        [0.1, 0, 0, 1, 1, 1, 0],    # B, 0.8: IoU with A = 0.9 / 1.1 = 0.818 -> dropped
        [0.8, 0, 0, 1, 1, 1, 0],    # C, 0.7: IoU with A = 0.2 / 1.8 = 0.111 -> kept; with B 0.3/1.7 (B is gone)
        [5, 5, 0, 1, 1, 1, 0.4],    # D, 0.95: far away -> kept
        [0, 0, 0, 1, 1, 1, 0],      # E, 0.85: same box as A
    ])
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.85])
    assert nms_3d(boxes, scores, 0.25).tolist() == [3, 0, 2]
    # per label: E has another label than A, so it survives
    labels = np.array([1, 1, 1, 1, 2])
    assert nms_3d(boxes, scores, 0.25, labels).tolist() == [3, 0, 4, 2]
    # a threshold above C-with-A's IoU (0.111) but below 0.3 / 1.7 = 0.176 keeps C only if B is gone
    assert nms_3d(boxes[:3], np.array([0.9, 0.8, 0.7]), 0.15).tolist() == [0, 2]


def test_postprocess_scores_each_kept_box_for_every_class():
    boxes = np.array([[0, 0, 0, 1, 1, 1, 0], [0.05, 0, 0, 1, 1, 1, 0], [3, 0, 0, 1, 1, 1, 0]], dtype=np.float64)
    obj = np.array([0.9, 0.6, 0.01])  # the third is below the confidence threshold
    sem = np.array([[0.8, 0.2], [0.7, 0.3], [0.5, 0.5]])
    b, c, s = postprocess(boxes, obj, sem, nms_iou=0.25, conf_threshold=0.05, per_class_proposal=True)
    assert c.tolist() == [0, 1] and np.allclose(s, [0.72, 0.18]) and np.allclose(b, boxes[[0, 0]])
    b, c, s = postprocess(boxes, obj, sem, nms_iou=0.25, conf_threshold=0.05, per_class_proposal=False)
    assert c.tolist() == [0] and np.allclose(s, [0.9])


def test_heading_encoding_by_hand_and_round_trip():
    cls, res = encode_heading(np.array([math.pi / 2, 0.6, 0.0, -0.1, math.pi]), 12)
    per = math.pi / 6
    # pi/2 is bin 3's centre; 0.6 is bin 1 (centre pi/6) + 0.0764; -0.1 wraps to bin 0 - 0.1; pi is bin 6
    assert cls.tolist() == [3, 1, 0, 0, 6]
    assert np.allclose(res, [0.0, 0.6 - per, 0.0, -0.1, 0.0], atol=1e-12)
    angles = np.random.default_rng(0).uniform(-np.pi, np.pi, 200)
    for bins in (1, 12, 7):
        c, r = encode_heading(angles, bins)
        assert (np.abs(r) <= np.pi / bins + 1e-12).all() and c.min() >= 0 and c.max() < bins
        back = decode_heading(c, r, bins)
        assert np.allclose(np.cos(back - angles), 1.0) and np.allclose(back, angles)


def test_size_encoding_round_trip():
    mean_sizes = np.array([[1.0, 2.0, 0.5], [0.4, 0.4, 0.9]])
    size = np.array([[1.2, 1.5, 0.5], [0.5, 0.3, 1.0]])
    cls = np.array([0, 1])
    res = encode_size(size, cls, mean_sizes)
    assert np.allclose(res, [[0.2, -0.5, 0.0], [0.1, -0.1, 0.1]])
    assert np.allclose(decode_size(cls, res, mean_sizes), size)


def test_transform_boxes_rotation_flip_scale():
    box = np.array([[1.0, 0.0, 0.5, 2.0, 1.0, 1.0, 0.0]])
    rot90 = np.eye(4)
    rot90[:2, :2] = [[0, -1], [1, 0]]
    out = transform_boxes(rot90, box)
    assert np.allclose(out, [[0, 1, 0.5, 2, 1, 1, math.pi / 2]])
    assert np.allclose(transform_boxes(rot90, box, axis_aligned=True), [[0, 1, 0.5, 1, 2, 1, 0]])
    # 30 degrees, axis-aligned: the extent of the turned 2 x 1 rectangle
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot30 = np.eye(4)
    rot30[:2, :2] = [[c, -s], [s, c]]
    aa = transform_boxes(rot30, box, axis_aligned=True)
    assert np.allclose(aa[0, 3:], [2 * c + 1 * s, 2 * s + 1 * c, 1, 0])
    # mirror x (x -> -x) of a box at heading 0.3: heading pi - 0.3; scale 2 doubles extents
    flip = np.diag([-2.0, 2.0, 2.0, 1.0])
    out = transform_boxes(flip, np.array([[1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 0.3]]))
    assert np.allclose(out[0, :6], [-2, 2, 2, 4, 2, 2]) and np.isclose(out[0, 6], math.pi - 0.3)
    # the points of a box stay in the moved box
    rng = np.random.default_rng(0)
    b = np.array([[0.3, -0.2, 1.0, 1.5, 0.6, 0.8, 0.7]])
    local = rng.uniform(-0.49, 0.49, (50, 3)) * b[0, 3:6]
    ch, sh = math.cos(0.7), math.sin(0.7)
    pts = np.stack([ch * local[:, 0] - sh * local[:, 1], sh * local[:, 0] + ch * local[:, 1], local[:, 2]], 1) + b[0, :3]
    assert points_in_boxes(pts, b).all()
    T = rot30 @ flip
    T[:3, 3] = [0.5, -1.0, 0.2]
    moved = pts @ T[:3, :3].T + T[:3, 3]
    assert points_in_boxes(moved, transform_boxes(T, b)).all()
    assert not points_in_boxes(moved + [0, 0, 5], transform_boxes(T, b)).any()


def test_vote_targets_by_hand():
    boxes = np.array([[0, 0, 0, 2, 2, 2, 0], [1, 0, 0, 2, 2, 2, 0]], dtype=np.float64)
    pts = np.array([[0.5, 0, 0], [-0.5, 0, 0], [5, 5, 5]], dtype=np.float64)
    votes, mask = vote_targets(pts, boxes, max_votes=3)
    assert mask.tolist() == [True, True, False]
    v = votes.reshape(3, 3, 3)
    # point 0 is in both boxes: votes to (0,0,0) and (1,0,0); the third slot repeats the first
    assert np.allclose(v[0], [[-0.5, 0, 0], [0.5, 0, 0], [-0.5, 0, 0]])
    assert np.allclose(v[1], [[0.5, 0, 0]] * 3)  # only in box 0
    # with instance classes, a point votes only for boxes of its instance's class
    votes, mask = vote_targets(pts, boxes, 3, box_labels=np.array([0, 1]), point_class=np.array([1, -1, 1]))
    assert mask.tolist() == [True, False, False]
    assert np.allclose(votes.reshape(3, 3, 3)[0], [[0.5, 0, 0]] * 3)


def test_scene_data_instance_and_box_targets(small_scannet):
    from harness.data.augment import AugmentConfig
    from harness.tasks.common import SceneData

    aug = AugmentConfig(rotate_z=0.3, scale_min=1.2, scale_max=1.2, flip=True, color_jitter=0.0, color_noise=0.0,
                        max_points=6000)
    data = SceneData(small_scannet, "train", 0.05, aug, limit=1, instances=True, boxes="oriented")
    s = data.sample(0, np.random.default_rng(3))
    scene = data.scene(0)
    T = s["transform"]
    crop_pts = scene["points"][s["crop"]].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    crop_inst = scene["instance"][s["crop"]]
    vox_inst = crop_inst[s["inverse"]]  # every point's voxel instance is its representative's
    for k in np.unique(s["instance"]):
        rows = s["instance"] == k
        if k == 0:
            assert (s["instance_class"][rows] == -100).all()
            continue
        assert np.allclose(s["instance_centre"][rows], crop_pts[crop_inst == k].mean(0), atol=1e-4)
        assert (s["instance_class"][rows] == scene["instance_label"][k]).all()
    assert len(vox_inst) == len(crop_pts)
    # boxes: those with a crop point inside, moved with the points (a 1.2 scale: extents x 1.2)
    inside = points_in_boxes(scene["points"][s["crop"]], scene["boxes"]).any(0)
    assert 0 < len(s["boxes"]) == inside.sum()
    assert np.allclose(s["boxes"][:, 3:6], 1.2 * scene["boxes"][inside][:, 3:6], atol=1e-4)
    assert points_in_boxes(crop_pts, s["boxes"]).any(0).all()
    # semantic segmentation's samples are unchanged: no extra targets unless asked for
    plain = SceneData(small_scannet, "train", 0.05, aug, limit=1).sample(0, np.random.default_rng(3))
    assert "instance_centre" not in plain and "boxes" not in plain
    assert np.array_equal(plain["coords"], s["coords"]) and np.array_equal(plain["semantic"], s["semantic"])


def test_a_sample_without_the_labels_a_task_needs_names_its_scene():
    import numpy as np
    import pytest

    from harness.tasks.common import collate

    sample = {"coords": np.zeros((2, 3), np.int32), "feats": np.zeros((2, 3), np.float32), "name": "08/000000"}
    with pytest.raises(ValueError, match=r"scene 08/000000 has no semantic labels: .*--force"):
        collate([sample])
    assert collate([sample], ())["coords"].shape == (2, 4)


def test_flip_axes_mirror_only_the_named_axes():
    """With rotation and scale off the transform is diag(+-1, +-1, 1): "x" never mirrors y
    (SUN RGB-D's views face +y, VoteNet flips x only), "xy" mirrors each about half the time."""
    from harness.data.augment import AugmentConfig, random_transform

    def signs(axes):
        cfg = AugmentConfig(rotate_z=0.0, scale_min=1.0, scale_max=1.0, flip=True, flip_axes=axes)
        rng = np.random.default_rng(0)
        return np.array([np.diag(random_transform(rng, cfg))[:3] for _ in range(400)])

    x_only = signs("x")
    assert set(x_only[:, 0]) == {-1.0, 1.0} and set(x_only[:, 1]) == {1.0} and set(x_only[:, 2]) == {1.0}
    both = signs("xy")
    assert 0.4 < (both[:, 0] < 0).mean() < 0.6 and 0.4 < (both[:, 1] < 0).mean() < 0.6
    assert set(signs("y")[:, 0]) == {1.0}
    with pytest.raises(ValueError, match=r"augment.flip_axes .* got 'z'"):
        signs("z")
