"""The feature picture's pieces: shared PCA basis, colour mapping, z-buffered splatting, CLI hook."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from methods.image_guided.visualize import default_output, pca_basis, register_cli, splat, to_rgb


def test_pca_basis_finds_the_direction_of_spread():
    # points on the line (3, 0) + t (1, 1)/sqrt(2): the first component is (1, 1)/sqrt(2) (sign made positive)
    t = np.linspace(-2, 2, 9)
    f = np.array([3.0, 0.0]) + t[:, None] * np.array([1.0, 1.0]) / math.sqrt(2)
    mean, comps = pca_basis(f, k=1)
    np.testing.assert_allclose(mean, [3.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(comps[0], [1 / math.sqrt(2), 1 / math.sqrt(2)], atol=1e-12)


def test_to_rgb_maps_the_range_to_0_1_and_clips():
    mean = np.zeros(2)
    comps = np.eye(2)[:2]
    lo, hi = np.array([-1.0, 0.0]), np.array([1.0, 4.0])
    rgb = to_rgb(np.array([[0.0, 1.0], [2.0, -1.0]]), mean, comps, lo, hi)
    # (0 - -1) / 2 = 0.5, (1 - 0) / 4 = 0.25; 2 -> 1.5 clipped to 1, -1 -> -0.25 clipped to 0
    np.testing.assert_allclose(rgb, [[0.5, 0.25], [1.0, 0.0]])


def test_splat_keeps_the_nearest_point_per_pixel():
    pixels = np.array([[1.0, 1.0], [1.2, 0.9], [0.0, 2.0], [7.0, 1.0]])
    depth = np.array([2.0, 1.0, 5.0, 1.0])
    colors = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [1.0, 1.0, 1.0]])
    img = splat(pixels, depth, colors, width=3, height=3, radius=0)
    np.testing.assert_allclose(img[1, 1], [0, 0, 1, 1])  # the blue point is nearer than the red one
    np.testing.assert_allclose(img[2, 0], [0, 1, 0, 1])
    assert img[..., 3].sum() == 2  # the point at u = 7 is outside the 3-pixel-wide image
    big = splat(pixels[:1], depth[:1], colors[:1], width=3, height=3, radius=1)
    assert big[..., 3].sum() == 9


def test_default_output_is_the_runs_report_directory():
    out = default_output(Path("runs/table1/pretrain/image_guided__s0"), "scene0012_00", 80)
    assert out == Path("runs/table1/report/features_image_guided__s0_scene0012_00_80.png")


def test_cli_hook_parses_visualize_features():
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["visualize", "features", "--weights", "runs/t/pretrain/image_guided__s0",
                              "--scene", "scene0012_00", "--frame", "80", "--dataset", "root=/data/scannet"])
    assert args.command == "visualize" and args.what == "features"
    assert args.weights == "runs/t/pretrain/image_guided__s0" and args.scene == "scene0012_00" and args.frame == 80
    assert args.dataset == ["root=/data/scannet"] and callable(args.func)


def test_splat_with_a_radius_per_point():
    # a near point drawn 3x3 at (1, 1) over a far one 1x1 at (2, 2): the near one covers (2, 2) too
    img = splat(np.array([[1.0, 1.0], [2.0, 2.0]]), np.array([1.0, 3.0]), np.array([[1.0, 0, 0], [0, 1.0, 0]]),
                width=4, height=4, radius=np.array([1, 0]))
    np.testing.assert_allclose(img[2, 2, :3], [1, 0, 0])
    assert img[..., 3].sum() == 9


def test_point_spacing_of_a_grid():
    from methods.image_guided.visualize import point_spacing

    g = np.stack(np.meshgrid(np.arange(10), np.arange(10), [0.0]), -1).reshape(-1, 3) * 0.04
    assert abs(point_spacing(g) - 0.04) < 1e-9
