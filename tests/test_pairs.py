"""Frame-pair mining and correspondences (baselines.pairs), against numbers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from baselines import pairs as P
from harness.data.frames import Frame, FrameRef, write_depth_png

V = 0.1  # voxel size of the hand-built cases


def centres(ijk) -> np.ndarray:
    """Points at the centres of the given voxels (size V)."""
    return (np.asarray(ijk, dtype=np.float64) + 0.5) * V


def line(xs, y=0, z=0):
    return [(x, y, z) for x in xs]


def test_neighbour_offsets_are_the_voxel_centres_within_one_and_a_half_voxels():
    d = P.neighbour_offsets(1.5)
    # |d|^2 <= 2.25: the centre, 6 face neighbours (|d| = 1), 12 edge neighbours (sqrt 2)
    assert len(d) == 1 + 6 + 12
    norms = (d ** 2).sum(1)
    assert sorted(set(norms.tolist())) == [0, 1, 2]
    assert len(P.neighbour_offsets(2.0)) == 1 + 6 + 12 + 8 + 6  # + corners (sqrt 3) + (2,0,0)-type


def test_overlap_of_hand_placed_voxels():
    A = line(range(10))  # x = 0..9
    B = line(range(5, 15))  # x = 5..14
    C = [(x, 1, 1) for x in range(10)]  # A moved by (0, 1, 1): sqrt(2) voxels away
    E = [(1, 1, 1)]  # sqrt(3) voxels from A's voxel (0, 0, 0), sqrt(2) from (1, 0, 0)
    G = [(0, 2, 0)]  # 2 voxels from (0, 0, 0)
    keys = [P.voxel_keys(centres(s), V) for s in (A, B, C, E, G)]
    O = P.overlap_matrix(keys, 1.5)
    # A's x = 4..9 have a B point within 1.5 voxels (x = 4 reaches x = 5); x = 0..3 do not
    assert O[0, 1] == pytest.approx(6 / 10, abs=0)
    assert O[1, 0] == pytest.approx(6 / 10, abs=0)  # B's x = 5..10
    assert O[0, 2] == 1.0 and O[2, 0] == 1.0
    # E = (1,1,1): sqrt(2) from A's (1,0,0), sqrt(3) from (0,0,0) and (2,0,0)
    assert O[3, 0] == 1.0
    assert O[0, 3] == pytest.approx(1 / 10, abs=0)
    # G = (0,2,0): 2 voxels from (0,0,0), farther from the rest
    assert O[0, 4] == 0.0 and O[4, 0] == 0.0
    assert np.all(np.diag(O) == 1.0)


def test_overlap_diagonal_and_distance_boundaries():
    # one voxel against one voxel at each offset: within iff |d| <= 1.5
    base = P.voxel_keys(centres([(0, 0, 0)]), V)
    cases = {(1, 0, 0): 1.0, (1, 1, 0): 1.0, (0, 1, -1): 1.0, (1, 1, 1): 0.0, (2, 0, 0): 0.0, (0, 0, 0): 1.0}
    for d, expected in cases.items():
        other = P.voxel_keys(centres([d]), V)
        O = P.overlap_matrix([base, other], 1.5)
        assert O[0, 1] == expected, d
    # a wider radius takes the corners: |(1,1,1)| = 1.732 <= 2
    O = P.overlap_matrix([base, P.voxel_keys(centres([(1, 1, 1)]), V)], 2.0)
    assert O[0, 1] == 1.0


def test_overlap_matches_a_brute_force_distance_count():
    rng = np.random.default_rng(3)
    sets = [np.unique(rng.integers(0, 9, (120, 3)), axis=0) + rng.integers(-2, 3, 3) for _ in range(6)]
    keys = [P.voxel_keys(centres(s), V) for s in sets]
    for radius in (1.5, 2.0, 1.0):
        O = P.overlap_matrix(keys, radius)
        for a in range(6):
            for b in range(6):
                pa, pb = centres(sets[a]), centres(sets[b])
                d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1)
                assert O[a, b] == pytest.approx(np.mean(d <= radius * V + 1e-9), abs=1e-12), (radius, a, b)


def test_overlap_uses_the_hash_index_for_huge_extents():
    # two far-apart clusters make a bounding box too large for the dense grid
    A = [(0, 0, 0), (1, 0, 0), (400000, 0, 0)]
    B = [(2, 0, 0), (400001, 1, 0)]
    keys = [P.voxel_keys(centres(s), V) for s in (A, B)]
    O_hash = P.overlap_matrix(keys, 1.5, max_grid_cells=1000)
    assert O_hash[0, 1] == pytest.approx(2 / 3, abs=0)  # (1,0,0) and (400000,0,0)
    assert O_hash[1, 0] == 1.0


def test_pair_selection_keeps_max_overlap_at_or_above_the_threshold():
    O = np.array([[1.0, 0.3, 0.1, 0.29],
                  [0.25, 1.0, 0.5, 0.0],
                  [0.9, 0.2, 1.0, 0.0],
                  [0.0, 0.0, 0.0, 1.0]])
    pairs = P.select_pairs(O, 0.3)
    # (0,1): max(0.3, 0.25) = 0.3 kept (boundary); (0,2): max(0.1, 0.9); (1,2): 0.5; (0,3): 0.29 dropped
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]


# ----------------------------------------------------------------------------------------------
# Hand-built depth frames: a fronto-parallel wall, each pixel on one voxel centre


W_PX, H_PX = 20, 4
Z = 1.05  # the wall's depth: the centre of voxel 10 in z


def plane_frame(shift: float, width: int = W_PX, pose_ok: bool = True, empty: bool = False) -> Frame:
    """Pixel (row, col) lands on the centre of voxel (col + shift, row, 10) in world coordinates."""
    K = np.array([[Z / V, 0, -0.5], [0, Z / V, -0.5], [0, 0, 1]])  # x = (col + 0.5) * V at depth Z
    depth = np.full((H_PX, width), 0.0 if empty else Z, dtype=np.float32)
    pose = np.eye(4)
    pose[0, 3] = shift * V
    if not pose_ok:
        pose[:3, :] = -np.inf
    return Frame(np.zeros((H_PX, width, 3), np.uint8), depth, pose, K, K, f"shift{shift}")


class MemoryRef:
    """A frame reference held in memory (exercises the generic ``load()`` path)."""

    def __init__(self, index: int, frame: Frame):
        self.index, self.frame = index, frame

    def load(self) -> Frame:
        return self.frame


def test_mined_pairs_of_hand_built_frames():
    shifts = [0, 5, 14, 15, 16]
    refs = [MemoryRef(i, plane_frame(s)) for i, s in enumerate(shifts)]
    refs.append(MemoryRef(5, plane_frame(0, width=4)))  # a narrow frame: columns 0..3
    refs.append(MemoryRef(6, plane_frame(3, pose_ok=False)))  # tracking lost: skipped
    refs.append(MemoryRef(7, plane_frame(3, empty=True)))  # no depth: skipped
    cfg = P.PairsConfig(voxel_size=V, radius_factor=1.5, min_overlap=0.3, workers=2)
    res = P.mine_pairs("hand", refs, cfg)
    assert res.positions == [0, 1, 2, 3, 4, 5]
    got = {tuple(p): tuple(o) for p, o in zip(res.pairs.tolist(), res.overlap.tolist())}
    # For two 20-column frames shifted by s >= 1 columns, the columns of the first within one
    # column of the second are s-1..19: (21 - s) of 20, in both directions.
    expected = {
        (0, 1): (16 / 20, 16 / 20),  # s = 5
        (0, 2): (7 / 20, 7 / 20),  # s = 14
        (0, 3): (6 / 20, 6 / 20),  # s = 15: exactly 0.3, kept
        (1, 2): (12 / 20, 12 / 20), (1, 3): (11 / 20, 11 / 20), (1, 4): (10 / 20, 10 / 20),
        (2, 3): (1.0, 1.0), (2, 4): (19 / 20, 19 / 20), (3, 4): (1.0, 1.0),
        # narrow frame (columns 0..3) vs frame 0: 5 of 20 columns one way (0.25), all 4 the other
        (0, 5): (5 / 20, 1.0),
        # frame 1 starts at column 5: the narrow frame's column 3 is 2 away, column 4 none: 0
    }
    # (0, 4): s = 16 gives 5/20 = 0.25 both ways: dropped
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert res.voxels == [80, 80, 80, 80, 80, 16]


def test_world_points_back_project_through_the_pose():
    f = plane_frame(7)
    pts = P.world_points(f.depth, f.k_depth, f.pose)
    # pixel (row 2, col 3) -> voxel centre (3 + 7, 2, 10)
    row, col = 2, 3
    np.testing.assert_allclose(pts[row * W_PX + col], [(col + 7 + 0.5) * V, (row + 0.5) * V, Z], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Cache


class DiskScenes:
    """A dataset with one scene of frames on disk, in the SensReader export layout."""

    def __init__(self, root: Path, shifts):
        self.root = root
        d = root / "frames" / "s0"
        for sub in ("depth", "pose"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(shifts):
            f = plane_frame(s)
            write_depth_png(d / "depth" / f"{i}.png", f.depth)
            np.savetxt(d / "pose" / f"{i}.txt", f.pose)
        self.K = plane_frame(0).k_depth

    def frames(self, scene):
        d = self.root / "frames" / scene
        ids = sorted(int(p.stem) for p in (d / "pose").glob("*.txt"))
        return [FrameRef(scene, i, d / "color" / f"{i}.jpg", d / "depth" / f"{i}.png", d / "pose" / f"{i}.txt",
                         self.K, self.K) for i in ids]


def test_pairs_are_cached_per_scene_parameters_and_frames(tmp_path, monkeypatch):
    ds = DiskScenes(tmp_path / "data", [0, 5, 16])
    cache = tmp_path / "cache"
    calls = []
    real = P.mine_pairs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "mine_pairs", counting)
    cfg = P.PairsConfig(voxel_size=V)
    first = P.scene_pairs(ds, "s0", cfg, cache)
    # depth PNG in millimetres: 1.05 m is exact; shifts 5 (16/20 columns) and 11 (10/20); 16: 5/20
    assert first.pairs.tolist() == [[0, 1], [1, 2]]
    assert first.overlap.tolist() == [[0.8, 0.8], [0.5, 0.5]]
    again = P.scene_pairs(ds, "s0", cfg, cache)
    assert len(calls) == 1 and again.pairs.tolist() == [[0, 1], [1, 2]]
    assert again.overlap.tolist() == [[0.8, 0.8], [0.5, 0.5]]
    assert len(list((cache / "frame-pairs").glob("s0-*.json"))) == 1
    # other parameters: mined again, into another file
    P.scene_pairs(ds, "s0", P.PairsConfig(voxel_size=V, min_overlap=0.2), cache)
    assert len(calls) == 2
    # workers do not change the result: same file
    P.scene_pairs(ds, "s0", P.PairsConfig(voxel_size=V, workers=1), cache)
    assert len(calls) == 2
    # a changed frame (new pose file contents): mined again
    pose = tmp_path / "data" / "frames" / "s0" / "pose" / "2.txt"
    np.savetxt(pose, plane_frame(4).pose, fmt="%.12f")
    third = P.scene_pairs(ds, "s0", cfg, cache)
    assert len(calls) == 3
    assert third.pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert third.overlap.tolist() == [[0.8, 0.8], [0.85, 0.85], [1.0, 1.0]]


# ----------------------------------------------------------------------------------------------
# Correspondences


def rigid(axis_angle, t) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(axis_angle).as_matrix()
    T[:3, 3] = t
    return T


def test_correspondences_are_recovered_through_a_known_rigid_transform():
    rng = np.random.default_rng(0)
    g = np.arange(6) * 0.1
    world = np.stack(np.meshgrid(g, g, [0.0, 0.1], indexing="ij"), -1).reshape(-1, 3)  # 72 points, 10 cm apart
    n = len(world)
    radius = 1.5 * 0.04  # voxel 4 cm: 6 cm
    pose_a = rigid([0.1, -0.2, 1.0], [1.0, 2.0, 0.5])
    pose_b = rigid([-0.3, 0.05, -2.0], [-0.5, 0.3, 1.5])
    # view B sees a shuffled subset of the points, each moved by less than the radius ...
    perm = rng.permutation(n)
    keep = perm[: n - 12]  # B's row r is world point keep[r]; 12 points of A have no partner
    noise = rng.normal(size=(len(keep), 3))
    noise *= (rng.uniform(0.0, 0.05, len(keep)) / np.linalg.norm(noise, axis=1))[:, None]
    world_b = world[keep] + noise
    # ... except two, moved by 5.5 cm (still matched) and 6.5 cm (not)
    world_b[0] = world[keep[0]] + [0.055, 0, 0]
    world_b[1] = world[keep[1]] + [0, 0, -0.065]
    cam_a = (world - pose_a[:3, 3]) @ pose_a[:3, :3]  # world -> camera: R^T (x - t)
    cam_b = (world_b - pose_b[:3, 3]) @ pose_b[:3, :3]
    ia, ib = P.correspondences(cam_a, cam_b, radius, pose_a, pose_b)
    expected = {int(keep[r]): r for r in range(len(keep)) if r != 1}
    assert dict(zip(ia.tolist(), ib.tolist())) == expected
    # without the registration the frames do not line up: (almost) nothing matches
    ia0, _ = P.correspondences(cam_a, cam_b, radius)
    assert len(ia0) < 5


def test_correspondences_take_the_nearest_point():
    a = np.array([[0.0, 0.0, 0.0]])
    b = np.array([[0.05, 0.0, 0.0], [0.0, 0.02, 0.0], [0.0, 0.0, -0.03]])
    ia, ib = P.correspondences(a, b, 0.06)
    assert ia.tolist() == [0] and ib.tolist() == [1]
    ia, ib = P.correspondences(a, b, 0.01)
    assert ia.tolist() == [] and ib.tolist() == []
