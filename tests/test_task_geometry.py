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
    with pytest.raises(ValueError, match="instance id 1000: .* needs ids below 1000"):
        gt_instance_ids(np.array([0, 1000]), np.full(1001, 3))


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
    # empty-box removal: 4 points inside the first box (|x| <= 0.5), so it goes; the second (|x - 0.05| <=
    # 0.5) holds those and a fifth at x = 0.54 and stays, now unsuppressed
    pts = np.array([[0.1, 0, 0], [-0.2, 0.1, 0], [0.3, -0.3, 0.2], [0.0, 0.4, -0.4], [0.54, 0, 0]])
    b, c, s = postprocess(boxes, obj, sem, 0.25, 0.05, False, points=pts, min_box_points=5)
    assert c.tolist() == [0] and np.allclose(s, [0.6]) and np.allclose(b, boxes[[1]])
    b, c, s = postprocess(boxes, obj, sem, 0.25, 0.05, False, points=pts, min_box_points=0)
    assert np.allclose(s, [0.9])


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
    # with instance ids, a point votes only for its own instance's box (point 0 belongs to box 1's
    # instance 7, though it lies in both boxes; point 1 to no boxed instance), in every slot
    votes, mask = vote_targets(pts, boxes, 3, point_instance=np.array([7, 2, 7]), box_instance=np.array([4, 7]))
    assert mask.tolist() == [True, False, True]
    assert np.allclose(votes.reshape(3, 3, 3)[0], [[0.5, 0, 0]] * 3)
    assert np.allclose(votes.reshape(3, 3, 3)[2], [[-4, -5, -5]] * 3)


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


# -- CSC's downstream augmentations --------------------------------------------------------------

def test_elastic_field_has_the_variance_of_twice_box_filtered_noise_at_grid_nodes():
    """Two passes of a 3-cell box filter per axis make the kernel [1, 2, 3, 2, 1] / 9 per axis:
    a node's noise has variance (1 + 4 + 9 + 4 + 1) / 81 per axis, (19/81)^3 in all, so a node
    away from the zero border moves by magnitude x 0.1136 (std) per coordinate."""
    from harness.data.augment import elastic_distort

    g = np.arange(0, 41, dtype=np.float64)
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    moved = elastic_distort(np.random.default_rng(0), pts, granularity=1.0, magnitude=2.0)
    inner = np.all((pts >= 3) & (pts <= 37), axis=1)
    std = (moved - pts)[inner].std() / 2.0
    assert abs(std / (19 / 81) ** 1.5 - 1) < 0.08, std
    # trilinear between nodes: two points 0.01 cell apart along x move by at most 0.01 x the
    # largest difference of two nodes, 2 x the largest node displacement
    a = np.array([[10.3, 20.6, 7.2], [10.31, 20.6, 7.2]])
    d = elastic_distort(np.random.default_rng(1), np.vstack([pts, a]), 1.0, 1.0) - np.vstack([pts, a])
    assert 0 < np.abs(d[-2] - d[-1]).max() <= 0.01 * 2 * np.abs(d[:-2]).max()
    np.testing.assert_array_equal(elastic_distort(np.random.default_rng(0), pts, 1.0, 0.0), pts)


def test_clip_keeps_the_cube_around_the_shifted_centre():
    from harness.data.augment import clip_mask

    x = np.arange(0.0, 10.5, 0.5)  # extent 10, centre 5
    pts = np.stack([x, np.zeros_like(x), np.zeros_like(x)], 1)
    keep = clip_mask(np.random.default_rng(0), pts, 4.0, [0.0, 0.0, 0.0])
    assert pts[keep, 0].min() == 1.0 and pts[keep, 0].max() == 8.5  # [1, 9)
    assert clip_mask(np.random.default_rng(0), pts, 11.0, [0.2, 0.2, 0.2]).all()  # narrower than the bound
    two = np.array([[0.0, 0, 0], [20.0, 0, 0]])  # the cube around x = 10 holds neither: both kept
    assert clip_mask(np.random.default_rng(0), two, 4.0, [0.0, 0.0, 0.0]).all()
    for seed in range(20):  # centre uniform in 5 +- 0.2 x 10: the window [c - 4, c + 4) within [-1, 11)
        kept = pts[clip_mask(np.random.default_rng(seed), pts, 4.0, [0.2, 0.0, 0.0]), 0]
        assert kept.min() >= 1.0 - 2.0 and kept.max() < 9.0 + 2.0 and 15 <= len(kept) <= 16


def test_csc_colour_set_by_hand():
    from harness.data.augment import AugmentConfig, jitter_colors

    c = np.array([[50, 10, 7], [100, 20, 7], [150, 30, 7]], np.uint8)
    only = dict(color_jitter=0.0, color_noise=0.0, color_shift=0.0, color_autocontrast=0.0)
    # auto-contrast: each channel stretched to 0..255, blended with one random factor; a flat channel stays
    out = jitter_colors(np.random.default_rng(0), c, AugmentConfig(**{**only, "color_autocontrast": 1.0}))
    stretched = np.array([[0, 0], [127.5, 127.5], [255, 255]])
    blend = (out[:, :2] - c[:, :2]) / (stretched - c[:, :2])
    assert 0 < blend[0, 0] < 1 and np.allclose(blend, blend[0, 0]) and np.all(out[:, 2] == 7)
    # shift: one offset per channel for every point, within +-0.1 x 255
    mid = np.array([[50, 110, 120], [100, 120, 120], [150, 130, 120]], np.uint8)  # no clipping at 0 or 255
    out = jitter_colors(np.random.default_rng(0), mid, AugmentConfig(**{**only, "color_shift": 0.1}))
    d = out - mid
    assert np.allclose(d, d[0]) and np.all(np.abs(d[0]) <= 25.5) and np.abs(d).max() > 0
    # drawn with probability color_prob: never at 0
    none = AugmentConfig(**{**only, "color_shift": 0.1, "color_noise": 5.0, "color_prob": 0.0})
    np.testing.assert_array_equal(jitter_colors(np.random.default_rng(0), c, none), c)


def test_dropout_applies_to_a_scene_with_its_probability_and_voxels_shift_within_the_bound():
    from harness.data.augment import dropout_mask, shift_voxels

    assert dropout_mask(np.random.default_rng(0), 1000, 0.5, prob=0.0).all()
    kept = [dropout_mask(np.random.default_rng(s), 1000, 0.2, prob=0.2).mean() for s in range(200)]
    dropped = np.array(kept) < 0.9
    assert 0.1 < dropped.mean() < 0.3 and abs(np.mean(np.array(kept)[dropped]) - 0.8) < 0.01
    offsets = np.array([shift_voxels(np.random.default_rng(s), np.zeros((1, 3), np.int64), 100)[0] for s in range(300)])
    assert offsets.min() == 0 and offsets.max() == 99
    np.testing.assert_array_equal(shift_voxels(np.random.default_rng(0), np.ones((2, 3)), 0), np.ones((2, 3)))


def test_scene_data_with_csc_augmentations(small_scannet):
    """The CSC ScanNet set runs end to end: every representative point moved by the elastic field
    (within a few magnitudes' noise std of the rigid transform), voxel coordinates offset by
    [0, 100); boxes refused with an elastic field."""
    from harness.data.augment import AugmentConfig
    from harness.tasks.common import SceneData

    csc = AugmentConfig(tilt=np.pi / 64, point_dropout=0.2, dropout_prob=0.2, color_jitter=0.0, color_noise=12.75,
                        color_autocontrast=0.2, color_shift=0.1, color_prob=0.95, elastic=[[0.2, 0.4], [0.8, 1.6]],
                        elastic_prob=1.0, coord_shift=100)
    data = SceneData(small_scannet, "train", 0.05, csc, limit=1, instances=True)
    s = data.sample(0, np.random.default_rng(0))
    T = s["transform"]
    rigid = data.scene(0)["points"][s["point_index"]].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    moved = np.linalg.norm(s["points"] - rigid, axis=1) / abs(np.linalg.det(T[:3, :3])) ** (1 / 3)
    assert np.median(moved) > 0.01 and moved.max() < 6 * (0.4 + 1.6) * (19 / 81) ** 1.5
    assert np.all(s["coords"].min(0) < 100) and s["coords"].min() >= 0 and len(s["instance_centre"]) == len(s["coords"])
    with pytest.raises(ValueError, match="augment.elastic moves points non-rigidly"):
        SceneData(small_scannet, "train", 0.05, csc, limit=1, boxes="axis_aligned")


def test_free_rotation_turns_about_a_random_axis_and_z_rotation_keeps_gravity():
    """PointContrast's views: a rotation (orthonormal, det 1) that leaves its axis fixed, with
    the up axis tilted by more than 10 degrees most of the time; the default keeps z up."""
    from harness.data.augment import AugmentConfig, random_transform, rotation_about

    R = rotation_about(np.array([0.0, 0.0, 2.0]), np.pi / 2)[:3, :3]
    np.testing.assert_allclose(R @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)  # right-handed about +z
    free = AugmentConfig(rotate_axis="free", tilt=0.0, scale_min=1.0, scale_max=1.0, flip=False)
    rng = np.random.default_rng(0)
    tilts = []
    for _ in range(300):
        R = random_transform(rng, free)[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert abs(np.linalg.det(R) - 1) < 1e-12
        tilts.append(np.degrees(np.arccos(np.clip(R[2, 2], -1, 1))))
    assert np.mean(np.array(tilts) > 10) > 0.8 and max(tilts) > 90
    upright = AugmentConfig(tilt=0.0, scale_min=1.0, scale_max=1.0, flip=False)
    assert all(random_transform(rng, upright)[2, 2] == 1.0 for _ in range(20))
    with pytest.raises(ValueError, match="rotate_axis must be 'z' or 'free', got 'x'"):
        random_transform(rng, AugmentConfig(rotate_axis="x"))


def test_grouping_of_points_collapsed_onto_their_centres_is_bounded_and_finds_the_same_instances(monkeypatch):
    """Shifted points of a well-trained model collapse onto instance centres: thousands of points
    closer than the radius. Past GROUP_MAX_PAIRS pairs the grouping links cell mates and nearest
    neighbours only, and still returns the same instances."""
    from harness.tasks import instseg

    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.002, (1500, 3))  # one instance's shifted points, all within 1 cm of its centre
    b = rng.normal(0, 0.002, (800, 3)) + [0.5, 0, 0]
    chain = np.stack([np.linspace(2, 2.5, 26), np.zeros(26), np.zeros(26)], 1)  # steps of 2 cm: one instance
    pts = np.concatenate([a, b, chain])
    labels = np.zeros(len(pts), np.int64)
    scores = np.arange(len(pts), dtype=np.float64)

    def groups():
        return sorted((len(m), round(s, 6)) for m, _, s in instseg.group_proposals(pts, labels, scores, [0], 0.03, 10))

    exact = groups()
    assert exact == [(26, float(np.mean(scores[2300:]))), (800, float(np.mean(scores[1500:2300]))),
                     (1500, float(np.mean(scores[:1500])))]
    monkeypatch.setattr(instseg, "GROUP_MAX_PAIRS", 1000)
    assert groups() == exact


def test_a_voxel_whose_class_vote_and_instance_disagree_has_no_offset_target(monkeypatch):
    """Voxel 1's points voted class 2 but its representative point belongs to an instance of
    class 1 (an object's border): only voxels 0 and 2 get offset targets."""
    from harness.tasks import instseg

    class Flat(torch.nn.Module):
        planes = (8,) * 8

        def forward(self, coords, feats):
            return feats.repeat(1, 8)[:, :8]

    model = instseg.InstSegModel(Flat(), num_classes=3, thing_classes=[1, 2], ignore_index=-100)
    seen = {}

    def capture(pred, target, mask):
        seen["mask"] = mask.tolist()
        return pred.sum() * 0, pred.sum() * 0

    monkeypatch.setattr(instseg, "offset_losses", capture)
    batch = {"coords": torch.zeros((3, 4), dtype=torch.int32), "feats": torch.ones(3, 3),
             "semantic": torch.tensor([1, 2, 2]), "instance_class": torch.tensor([1, 1, 2]),
             "instance_centre": torch.zeros(3, 3), "points": torch.zeros(3, 3)}
    model(batch)
    assert seen["mask"] == [True, False, True]


def test_detection_scenes_are_sampled_to_a_point_budget_before_voxelisation(small_scannet):
    """VoteNet's random_sampling: at most sample_points of a scene's points, a uniform draw (the
    same one at every evaluation of a scene), then voxelised; boxes keep following the points."""
    from harness.tasks.common import SceneData

    full = SceneData(small_scannet, "val", 0.05, None, limit=1, boxes="axis_aligned")
    n = len(full.scene(0)["points"])
    data = SceneData(small_scannet, "val", 0.05, None, limit=1, boxes="axis_aligned", sample_points=n // 3)
    a, b = data.sample(0), data.sample(0)
    assert len(a["crop"]) == n // 3 and len(np.unique(a["crop"])) == n // 3
    np.testing.assert_array_equal(a["crop"], b["crop"])
    assert len(a["coords"]) < len(full.sample(0)["coords"])
    scene_pts = full.scene(0)["points"]
    kept = points_in_boxes(scene_pts[a["crop"]], full.scene(0)["boxes"]).any(0)
    assert len(a["boxes"]) == kept.sum()
    assert len(SceneData(small_scannet, "val", 0.05, None, limit=1, sample_points=10 * n).sample(0)["crop"]) == n
