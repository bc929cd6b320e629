"""CSC: shape-context partitions of hand-placed points, the partitioned loss by hand, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines.csc import CSC, CSCModel, partition_bins, partition_info_nce
from harness.registry import METHODS

from .multiscan_fixtures import method_config, pair_scannet, tiny_context  # noqa: F401

TAU = 0.4

# Around the anchor at the origin: (point, partition) with
#   radial 0 for 2 <= d < 20, 1 for d >= 20, none for d < 2;
#   xy 0 when atan2(dy, dx) in [0, pi), 1 in [pi, 2 pi)  (dy > 0, or dy = 0 with dx >= 0: 0);
#   zy 0 when atan2(dy, dz) mod pi in [0, pi/2), 1 in [pi/2, pi);
#   partition = 4 radial + 2 xy + zy.
HAND = [
    ((0, 0, 0), -1),  # the anchor itself: d = 0 < r1
    ((3, 0, 0), 0),  # xy angle 0, zy angle atan2(0, 0) = 0
    ((-3, 0, 0), 2),  # xy angle pi: bin 1
    ((0, 3, 4), 0),  # xy pi/2 (bin 0); zy atan2(3, 4) = 0.64 < pi/2 (bin 0)
    ((0, 3, -4), 1),  # zy atan2(3, -4) = 2.50 >= pi/2
    ((0, -3, 4), 3),  # xy -pi/2 -> 3 pi/2 (bin 1); zy -0.64 mod pi = 2.50 (bin 1)
    ((0, -3, -4), 2),  # xy bin 1; zy atan2(-3, -4) = -2.50 mod pi = 0.64 (bin 0)
    ((0, 2, 0), 1),  # d = r1 exactly: radial 0; zy atan2(2, 0) = pi/2: bin 1 (boundary)
    ((1, 1, 1), -1),  # d = 1.73 < r1
    ((0, 0, -5), 0),  # xy atan2(0, 0) = 0; zy atan2(0, -5) = pi mod pi = 0
    ((1.5, -1.5, 0.5), 3),  # d = 2.18; xy bin 1; zy atan2(-1.5, 0.5) mod pi = 1.89: bin 1
    ((20, 0, 0), 4),  # d = r2 exactly: radial 1
    ((12, 16, 0), 5),  # d = 20 exactly; xy 0.93 (bin 0); zy pi/2 (bin 1)
    ((-30, 0, -1), 6),  # radial 1; xy pi (bin 1); zy atan2(0, -1) = pi mod pi = 0
    ((0, -20, 0), 7),  # radial 1; xy 3 pi/2 (bin 1); zy -pi/2 mod pi = pi/2 (bin 1)
]


def test_partitions_of_hand_placed_points_including_the_boundaries():
    xyz = torch.tensor([p for p, _ in HAND], dtype=torch.float32)
    bins = partition_bins(xyz, 2.0, 20.0)
    assert bins[0].tolist() == [b for _, b in HAND]
    # seen from (3, 0, 0) the origin is at (-3, 0, 0): xy angle pi
    assert bins[1, 0].item() == 2
    # seen from (20, 0, 0) the origin is 20 away at xy angle pi: radial 1, xy 1, zy 0
    assert bins[11, 0].item() == 6
    # seen from (0, 2, 0): the origin at distance 2, direction (0, -2, 0): xy 1, zy -pi/2 mod pi -> 1
    assert bins[7, 0].item() == 3
    assert torch.all(torch.diagonal(bins) == -1)


def _published_bins(xyz: np.ndarray, r1: float, r2: float) -> np.ndarray:
    """The shape-context partition with floating-point angles (fine away from the bin edges)."""
    m = len(xyz)
    out = np.full((m, m), -1)
    for i in range(m):
        for j in range(m):
            dx, dy, dz = xyz[j] - xyz[i]
            d = math.sqrt(dx * dx + dy * dy + dz * dz)
            if d < r1:
                continue
            radial = 0 if d < r2 else 1
            a_xy = math.fmod(math.atan2(dy, dx) + 2 * math.pi, 2 * math.pi)
            a_zy = math.fmod(math.atan2(dy, dz) + 2 * math.pi, math.pi)
            out[i, j] = radial * 4 + int(a_xy // math.pi) * 2 + int(a_zy // (math.pi / 2))
    return out


def test_partitions_agree_with_floating_point_angles_off_the_edges():
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-30, 30, (60, 3))
    xyz[:20] *= 0.1  # some points within r1 of each other
    rel = xyz[None] - xyz[:, None]
    d = np.linalg.norm(rel, axis=-1)
    off_edges = (np.abs(rel).min(-1) > 1e-3) & (np.abs(d - 2) > 1e-3) & (np.abs(d - 20) > 1e-3)
    got = partition_bins(torch.tensor(xyz, dtype=torch.float64), 2.0, 20.0).numpy()
    want = _published_bins(xyz, 2.0, 20.0)
    assert np.array_equal(got[off_edges], want[off_edges])
    assert set(np.unique(got).tolist()) == set(range(-1, 8))


# Three anchors on the x axis (voxel units): from 0 the others are at +3 (partition 0) and -3
# (partition 2); from (3,0,0) both others lie at -x (partition 2); from (-3,0,0) both at +x (0).
ANCHORS = torch.tensor([[0.0, 0, 0], [3.0, 0, 0], [-3.0, 0, 0]])
FA = torch.eye(3)
FB = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.8, 0.0, 0.6]])
# logits / tau:  row 0: (1.5, 0, 2.0)   row 1: (2.0, 2.5, 0)   row 2: (0, 0, 1.5)


def _hand_partition_losses():
    e = math.exp
    p0 = ((math.log(e(1.5) + e(0)) - 1.5)  # row 0: its negative k = 1
          + 0.0  # row 1: nothing in partition 0
          + (math.log(e(1.5) + e(0) + e(0)) - 1.5)) / 3  # row 2: negatives k = 0, 1
    p2 = ((math.log(e(1.5) + e(2.0)) - 1.5)  # row 0: negative k = 2
          + (math.log(e(2.5) + e(2.0) + e(0)) - 2.5)  # row 1: negatives k = 0, 2
          + 0.0) / 3  # row 2: nothing in partition 2
    return p0, p2


def test_partitioned_info_nce_by_hand():
    bins = partition_bins(ANCHORS, 2.0, 20.0)
    assert bins.tolist() == [[-1, 0, 2], [2, -1, 2], [0, 0, -1]]
    per = partition_info_nce(FA * 2.0, FB * 5.0, bins, TAU)  # scale does not matter (normalised)
    p0, p2 = _hand_partition_losses()
    assert per.tolist() == pytest.approx([p0, 0, p2, 0, 0, 0, 0, 0], rel=1e-6, abs=1e-7)


def _two_scene_batch():
    # scene 0: the three anchors above; scene 1: two anchors 1 voxel apart (no partition at all)
    out = torch.cat([FA, FB, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([[0, 1.0, 0], [1.0, 0, 0]])])
    batch = {"match_a": torch.tensor([0, 1, 2, 6, 7]), "match_b": torch.tensor([3, 4, 5, 8, 9]),
             "match_item": torch.tensor([0, 0, 0, 1, 1]),
             "anchor": torch.cat([ANCHORS, torch.tensor([[5.0, 5, 5], [6.0, 5, 5]])])}
    return out, batch


def test_partition_losses_are_summed_and_scenes_averaged_without_cross_scene_negatives():
    p0, p2 = _hand_partition_losses()
    out, batch = _two_scene_batch()
    model = CSCModel(torch.nn.Identity(), method_config("csc", num_matches=4096))
    assert model.loss(out, batch)["loss"].item() == pytest.approx((p0 + p2 + 0.0) / 2, rel=1e-6)
    mean_model = CSCModel(torch.nn.Identity(), method_config("csc", num_matches=4096, partition_reduction="mean"))
    assert mean_model.loss(out, batch)["loss"].item() == pytest.approx((p0 + p2) / 8 / 2, rel=1e-6)


def test_registered_with_the_published_recipe():
    assert METHODS.get("csc") is CSC
    assert CSC.group == "Multi-scan" and CSC.consumes == ("frame_pairs",)
    cfg = method_config("csc")
    assert (cfg.tau, cfg.input_features, cfg.r1, cfg.r2, cfg.partition_reduction) == (0.4, "rgb", 2.0, 20.0, "sum")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.8, 0.0001)
    assert (cfg.schedule.name, cfg.schedule.gamma, cfg.schedule.step_size) == ("step", 0.99, 1000)
    full = method_config("csc", batch_size=32, voxel_size=0.025, num_matches=4096, steps=100000)
    assert full.voxel_size == 0.025 and full.num_matches == 4096 and full.pairs.min_overlap == 0.3


def test_colour_features_of_the_views(pair_scannet, tmp_path):
    method = CSC(method_config("csc"))
    batch = method.batch_stream(tiny_context(tmp_path, pair_scannet)).next()
    feats = batch["feats"]
    # RGB/255 - 0.5, not constant
    assert feats.min() >= -0.5 and feats.max() <= 0.5 and feats.std() > 0.01


def test_csc_lowers_its_loss_on_embedded_pairs(pair_scannet, tmp_path):
    from .test_pointcontrast import _fit

    method = CSC(method_config("csc", num_matches=128, batch_size=1))
    losses = _fit(method, tiny_context(tmp_path, pair_scannet), 20)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
