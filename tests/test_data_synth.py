"""synth extensions: yaw-rotated parts, the lidar model's culling, surface sampling."""

from __future__ import annotations

import numpy as np

from harness.data import synth
from harness.data.synth import BoxScene, Instance, Part


def scene_of(parts):
    return BoxScene.build(parts, [Instance(1, "a", (100, 150, 200)), Instance(2, "b", (50, 50, 50))])


def test_quarter_turned_box_renders_like_the_swapped_box():
    # a 2 x 1 box turned by 90 degrees about its centre is the 1 x 2 box
    turned = scene_of([Part((-1.0, 2.5, 0.0), (1.0, 3.5, 1.0), 0, yaw=np.pi / 2)])
    swapped = scene_of([Part((-0.5, 2.0, 0.0), (0.5, 4.0, 1.0), 0)])
    K = synth.intrinsics(64, 48, 40.0)
    pose = synth.look_at([0.3, -2.0, 2.0], [0.0, 3.0, 0.3])
    d1, _, p1 = synth.render_rgbd(turned, K, pose, 64, 48)
    d2, _, p2 = synth.render_rgbd(swapped, K, pose, 64, 48)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_allclose(d1, d2, atol=1e-9)
    o = np.array([0.3, -2.0, 2.0])
    dirs = np.array([[0.0, 1.0, -0.3], [-0.05, 1.0, -0.35], [0.3, 1.0, -0.2]])
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    _, _, n1 = synth.raycast(turned, o, dirs)
    _, _, n2 = synth.raycast(swapped, o, dirs)
    np.testing.assert_allclose(n1, n2, atol=1e-12)
    # per-ray origins: one ray into the +x side face, one into the top
    origins = np.array([[3.0, 3.2, 0.5], [0.1, 3.0, 4.0]])
    dirs = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    t1, _, n1 = synth.raycast(turned, origins, dirs)
    np.testing.assert_allclose(t1, [2.5, 3.0])
    np.testing.assert_allclose(n1, [[1, 0, 0], [0, 0, 1]], atol=1e-12)


def test_lidar_culling_changes_nothing():
    rng = np.random.default_rng(3)
    parts = [Part((-40, -40, -2.0), (40, 40, -1.7), 1)]
    for _ in range(40):
        c, s = rng.uniform(-25, 25, 2), rng.uniform(0.2, 4, 3)
        parts.append(Part((c[0], c[1], -1.7), (c[0] + s[0], c[1] + s[1], -1.7 + s[2]), 0,
                          yaw=float(rng.uniform(-1, 1)) if rng.uniform() < 0.4 else 0.0))
    scene = scene_of(parts)
    pose = synth.rigid(0.4, [0.5, -0.3, 0.0])
    el = np.deg2rad(np.linspace(-25, 3, 16))
    scan = synth.lidar_scan(scene, pose, el, 360, max_range=80.0, min_range=1.0)
    d_w = synth.rows_times(synth.lidar_directions(el, 360), pose[:3, :3])
    t, part, _ = synth.raycast(scene, pose[:3, 3], d_w)
    ok = np.isfinite(t) & (t >= 1.0) & (t <= 80.0)
    np.testing.assert_array_equal(scan["ray"], np.nonzero(ok)[0])
    np.testing.assert_array_equal(scan["range"], t[ok])
    np.testing.assert_array_equal(scan["part"], part[ok])


def test_sample_surface_points_lie_on_visible_faces():
    scene = scene_of([Part((0, 0, 0), (2, 1, 1), 0, hidden=(4,)), Part((3, 0, 0), (4, 1, 1), 1, yaw=0.3)])
    s = synth.sample_surface(scene, 200.0, np.random.default_rng(0))
    first = s["part"] == 0
    p = s["points"][first]
    on_face = np.isclose(p, 0).any(1) | np.isclose(p[:, :1], 2).any(1) | np.isclose(p[:, 1:], 1).any(1)
    assert on_face.all() and not np.isclose(p[:, 2], 0).all()
    assert not (np.isclose(p[:, 2], 0) & (p[:, 0] > 0.01) & (p[:, 0] < 1.99) & (p[:, 1] > .01) & (p[:, 1] < .99)).any()
    # the turned part: in its own frame the points are on its faces
    q = s["points"][~first] - [3.5, 0.5, 0.5]
    c, sn = np.cos(-0.3), np.sin(-0.3)
    q = q @ np.array([[c, -sn, 0], [sn, c, 0], [0, 0, 1]]).T
    assert (np.abs(q) <= 0.5 + 1e-9).all() and np.isclose(np.abs(q).max(1), 0.5).all()
    assert s["colors"].dtype == np.uint8 and len(s["colors"]) == len(s["points"])
