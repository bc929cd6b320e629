"""Stage-2 geometry: hand-placed points projected to hand-computed pixels (occlusion, out of view,
extrinsics, separate depth intrinsics), bilinear feature lookup, and the point-pixel link surviving
the 3D augmentations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.data.frames import Frame, project
from methods.image_guided.stage2 import (Stage2Config, frame_sample, point_pixels, prepare_image,
                                         sample_pixel_features)

# colour camera: 100 x 80 pixels, f = 100, principal point (50, 40)
K = np.array([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]])
# depth camera: half the resolution (50 x 40), f = 50, principal point (24.75, 19.75)
KD = np.array([[50.0, 0, 24.75], [0, 50, 19.75], [0, 0, 1]])

# camera-frame points and their pixels by hand: u = 100 x / z + 50, v = 100 y / z + 40
P_FRONT = (0.2, -0.1, 2.0)   # u = 60, v = 35
P_CENTRE = (0.0, 0.0, 1.0)   # u = 50, v = 40
P_RIGHT = (1.5, 0.0, 1.0)    # u = 200: right of the image
P_BEHIND = (0.0, 0.0, -1.0)  # behind the camera
P_EDGE = (0.494, 0.0, 1.0)   # u = 99.4: inside (the last column spans up to 99.5)


def test_pixels_without_depth_test():
    pts = np.array([P_FRONT, P_CENTRE, P_RIGHT, P_BEHIND, P_EDGE])
    ok, uv = point_pixels(pts, K, 100, 80)
    assert ok.tolist() == [True, True, False, False, True]
    np.testing.assert_allclose(uv[[0, 1, 4]], [[60, 35], [50, 40], [99.4, 40]], atol=1e-9)


def test_depth_test_uses_the_depth_intrinsics_and_finds_occlusion():
    depth = np.full((40, 50), 3.0)
    # P_FRONT in the depth image: u = 50 * 0.1 + 24.75 = 29.75 -> column 30, v = 50 * -0.05 + 19.75 = 17.25 -> row 17
    depth[17, 30] = 1.5  # a surface at 1.5 m in front of it: occluded (2.0 > 1.5 + 0.05)
    # P_CENTRE: u = 24.75 -> 25, v = 19.75 -> 20; unmeasured there: no target
    depth[20, 25] = 0.0
    pts = np.array([P_FRONT, P_CENTRE, (0.2, -0.1, 1.52)])  # the third lies on the surface (within 5 cm)
    ok, uv = point_pixels(pts, K, 100, 80, depth=depth, k_depth=KD, tolerance=0.05)
    assert ok.tolist() == [False, False, True]
    np.testing.assert_allclose(uv[2], [100 * 0.2 / 1.52 + 50, 100 * -0.1 / 1.52 + 40])
    depth[17, 30] = 2.03  # measured surface 3 cm in front: within tolerance, visible
    ok, _ = point_pixels(pts[:1], K, 100, 80, depth=depth, k_depth=KD, tolerance=0.05)
    assert ok.tolist() == [True]


def test_world_frame_points_go_through_the_extrinsics():
    # camera-to-world pose: camera at (1, 2, 0.5), turned 90 degrees about the world z axis
    pose = np.eye(4)
    pose[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    pose[:3, 3] = [1, 2, 0.5]
    cam = np.array([P_FRONT, P_CENTRE, P_RIGHT])
    # world = R @ cam + t by hand: (x, y, z) -> (-y + 1, x + 2, z + 0.5)
    world = np.array([[1.1, 2.2, 2.5], [1.0, 2.0, 1.5], [1.0, 3.5, 1.5]])
    np.testing.assert_allclose(world, cam @ pose[:3, :3].T + pose[:3, 3])
    ok, uv = point_pixels(world, K, 100, 80, world_to_camera=np.linalg.inv(pose))
    assert ok.tolist() == [True, True, False]
    np.testing.assert_allclose(uv[:2], [[60, 35], [50, 40]], atol=1e-9)


def test_prepare_image_pads_to_a_multiple_of_32_and_reports_the_scale():
    color = np.zeros((240, 320, 3), np.uint8)
    img, (sx, sy) = prepare_image(color, None)
    assert tuple(img.shape) == (3, 256, 320) and (sx, sy) == (1.0, 1.0)
    img, (sx, sy) = prepare_image(color, [160, 120])
    assert tuple(img.shape) == (3, 128, 160) and (sx, sy) == (0.5, 0.5)


def test_bilinear_feature_lookup_by_hand():
    # 2 channels on a 2 x 4 map: channel 0 = column index, channel 1 = 1
    fmap = torch.zeros(2, 2, 4)
    fmap[0] = torch.arange(4.0)
    fmap[1] = 1.0
    uv = torch.tensor([[1.5, 0.0], [3.0, 1.0], [0.25, 0.5]])
    out = sample_pixel_features(fmap, uv, (2, 4))
    # (1.5, 1) / |(1.5, 1)|, (3, 1) / |(3, 1)|, (0.25, 1) / |(0.25, 1)|
    expect = np.array([[1.5, 1.0], [3.0, 1.0], [0.25, 1.0]])
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), expect, atol=1e-6)


def _coded_frame() -> Frame:
    """A frame looking at a wall at 2 m: 40 x 32 depth, 80 x 64 colour whose pixel (u, v) has colour
    (red, green) = (2u + 20, 2v + 40): a colour names the pixel it came from."""
    hd, wd, hc, wc = 32, 40, 64, 80
    k_depth = np.array([[40.0, 0, 19.5], [0, 40, 15.5], [0, 0, 1]])
    k_color = np.array([[80.0, 0, 39.5], [0, 80, 31.5], [0, 0, 1]])
    depth = np.full((hd, wd), 2.0, np.float32)
    depth[:, :5] = 0.0  # an unmeasured strip
    vv, uu = np.meshgrid(np.arange(hc), np.arange(wc), indexing="ij")
    color = np.stack([2 * uu + 20, 2 * vv + 40, np.full_like(uu, 7)], -1).astype(np.uint8)
    pose = np.eye(4)
    pose[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]  # camera looking along world +y, z up
    pose[:3, 3] = [0.3, -1.0, 1.2]
    return Frame(color, depth, pose, k_color, k_depth, "coded")


@pytest.mark.parametrize("world", [True, False])
def test_point_pixel_link_survives_dropout_rotation_scaling_and_voxelisation(world):
    cfg = OmegaConf.structured(Stage2Config)
    cfg.world_frame = world
    cfg.image_size = None  # pixels in the stored colour image's coordinates
    cfg.points_per_frame = 50
    cfg.augment.color_jitter = 0.0
    cfg.augment.color_noise = 0.0  # colours unchanged: a voxel's input colour names its point's pixel
    cfg.augment.point_dropout = 0.3
    frame = _coded_frame()
    s = frame_sample(frame, np.random.default_rng(5), cfg, voxel_size=0.05, input_features="rgb")
    assert len(s["rows"]) == 50 and len(np.unique(s["rows"])) == 50
    rgb = np.rint((s["feats"][s["rows"]] + 0.5) * 255).astype(int)
    u_from_colour = (rgb[:, 0] - 20) / 2
    v_from_colour = (rgb[:, 1] - 40) / 2
    # the target pixel is where the voxel's own point projects: the colour it was given came from the
    # nearest colour pixel of that projection
    np.testing.assert_allclose(u_from_colour, np.rint(s["uv"][:, 0]), atol=0)
    np.testing.assert_allclose(v_from_colour, np.rint(s["uv"][:, 1]), atol=0)
    # the unmeasured strip (depth columns 0..4, colour columns < ~10) has no points at all
    assert s["uv"][:, 0].min() >= 9


# -- intrinsics against the stored image size --------------------------------------------------

K_FULL = np.array([[1170.0, 0.0, 647.5], [0.0, 1170.0, 483.5], [0.0, 0.0, 1.0]])  # a 1296x968 colour camera


def test_intrinsics_of_a_resized_export_are_rescaled_to_the_pixel_the_point_was_resized_to():
    from harness.data.frames import intrinsics_for

    assert intrinsics_for(K_FULL, (1296, 968), 1296, 968, Path("c.jpg")) is K_FULL
    K = intrinsics_for(K_FULL, (1296, 968), 648, 484, Path("c.jpg"))
    # a point seen at pixel centre (100, 200) of the full image lies at ((100.5) / 2 - 0.5, (200.5) / 2 - 0.5)
    p = np.array([[(100 - 647.5) / 1170.0 * 3.0, (200 - 483.5) / 1170.0 * 3.0, 3.0]])
    np.testing.assert_allclose(project(p, K_FULL)[0], [[100.0, 200.0]])
    np.testing.assert_allclose(project(p, K)[0], [[49.75, 99.75]])
    # ScanNet's SensReader resize to 640x480 scales x and y by slightly different factors
    K = intrinsics_for(K_FULL, (1296, 968), 640, 480, Path("c.jpg"))
    np.testing.assert_allclose(project(p, K)[0], [[100.5 * 640 / 1296 - 0.5, 200.5 * 480 / 968 - 0.5]])


def test_an_image_that_does_not_fit_its_intrinsics_is_named():
    from harness.data.frames import intrinsics_for

    with pytest.raises(ValueError, match=r"c.jpg: image is 480x480, its intrinsics are for 1296x968"):
        intrinsics_for(K_FULL, (1296, 968), 480, 480, Path("c.jpg"))
    # no recorded size: a principal point far from the image centre gives the resize away
    with pytest.raises(ValueError, match=r"c.jpg: image is 640x480 but .* principal point at \(647.5, 483.5\), "
                                         r"i.e. for an image of about 1296x968"):
        intrinsics_for(K_FULL, None, 640, 480, Path("c.jpg"))
    assert intrinsics_for(K_FULL, None, 1296, 968, Path("c.jpg")) is K_FULL


def test_a_frame_loads_with_intrinsics_for_its_stored_images(tmp_path):
    from harness.data.frames import FrameRef, write_depth_png

    Image.fromarray(np.zeros((484, 648, 3), np.uint8)).save(tmp_path / "0.jpg")
    write_depth_png(tmp_path / "0.png", np.ones((480, 640), np.float32))
    np.savetxt(tmp_path / "0.txt", np.eye(4))
    K_depth = np.array([[580.0, 0.0, 319.5], [0.0, 580.0, 239.5], [0.0, 0.0, 1.0]])
    ref = FrameRef("s", 0, tmp_path / "0.jpg", tmp_path / "0.png", tmp_path / "0.txt", K_FULL, K_depth,
                   color_size=(1296, 968), depth_size=(640, 480))
    frame = ref.load()
    np.testing.assert_allclose(frame.k_color[0], [585.0, 0.0, 323.5])
    assert frame.k_depth is K_depth
    ref.color_size = None
    with pytest.raises(ValueError, match="0.jpg: image is 648x484"):
        ref.load()


def test_frames_padded_to_one_shape_but_of_different_sizes_are_not_batched():
    """640x480 and 630x470 images pad to the same tensor; the batch has one valid size, so it
    would misplace the border of one of them: refused, naming both sizes."""
    from methods.image_guided.stage2 import collate_frames

    def sample(valid_hw):
        return {"coords": np.zeros((1, 3), np.int32), "rows": np.zeros(1, np.int64), "feats": np.zeros((1, 3), np.float32),
                "uv": np.zeros((1, 2), np.float32), "image": torch.zeros(3, 480, 640), "valid_hw": valid_hw}

    assert collate_frames([sample((480, 640)), sample((480, 640))])["valid_hw"].tolist() == [480, 640]
    with pytest.raises(ValueError, match=r"different colour image sizes \(height, width\) \[\(470, 630\), \(480, 640\)\]"):
        collate_frames([sample((480, 640)), sample((470, 630))])
