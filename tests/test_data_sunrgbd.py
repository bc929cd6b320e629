"""SUN RGB-D reader: the real depth PNG (bit rotation), hand-written frames in the official layout,
and the embedded miniature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from .data_helpers import config, sample, small_sunrgbd  # noqa: F401
from harness.data.sunrgbd import (SPLIT_FILE, SUNRGBD, SUNRGBDConfig, class_name, decode_depth, encode_depth,
                                  polygon_box, read_depth)

REAL = ("sunrgbd", "not_official_layout", "open3d_test_data")


def test_real_depth_png_needs_the_rotation():
    path = sample(*REAL, "SUN_depth.png")
    raw = np.asarray(Image.open(path))
    assert raw.shape == (480, 640) and raw.dtype == np.uint16
    assert raw.min() == 0 and raw.max() == 64152 and int((raw == 0).sum()) == 56012
    mm = decode_depth(raw)
    nz = mm[raw > 0]
    assert nz.min() == 1057 and nz.max() == 9870 and int(np.median(nz)) == 2723
    low = (raw & 7) != 0
    assert int(low.sum()) == 7149
    np.testing.assert_array_equal(low, mm >= 8192)
    assert np.any((raw >> 3)[low] != mm[low])  # a plain shift is wrong for these pixels
    np.testing.assert_array_equal(encode_depth(mm), raw)  # the rotation is a bijection
    metres = read_depth(path)
    assert metres.max() == np.float32(8.0) and np.isclose(metres[raw > 0].min(), 1.057)


def write_split(root: Path, train, test) -> None:
    def cell(names):
        arr = np.empty((1, len(names)), dtype=object)
        arr[0, :] = [f"/n/fs/sun3d/data/SUNRGBD/{n}/" for n in names]
        return arr

    path = root / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"alltrain": cell(train), "alltest": cell(test),
                                 "trainvalsplit": {"train": cell(train), "val": cell([])}})


def write_frame(root: Path, name: str, rgb, depth_png, K, tilt, objects=None) -> Path:
    d = root / "SUNRGBD" / name
    for sub in ("image", "depth", "extrinsics", "annotation3Dfinal"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    if isinstance(rgb, Path):
        (d / "image" / rgb.name).symlink_to(rgb)
    else:
        Image.fromarray(rgb).save(d / "image" / "0001.jpg", quality=100)
    if isinstance(depth_png, Path):
        (d / "depth" / depth_png.name).symlink_to(depth_png)
    else:
        Image.fromarray(depth_png).save(d / "depth" / "0001.png")
    (d / "intrinsics.txt").write_text("\n".join(" ".join(map(str, r)) for r in K))
    (d / "extrinsics" / "20130101000000.txt").write_text("\n".join(" ".join(map(str, r)) for r in np.eye(3)))
    (d / "extrinsics" / "20150101000000.txt").write_text("\n".join(" ".join(map(str, r)) for r in tilt))
    if objects is not None:
        (d / "annotation3Dfinal" / "index.json").write_text(json.dumps({"name": name, "objects": objects}))
    return d


def test_real_frame_in_official_layout(tmp_path):
    color = sample(*REAL, "SUN_color.jpg")
    depth = sample(*REAL, "SUN_depth.png")
    K = [[518.857901, 0, 284.582449], [0, 519.469611, 208.736166], [0, 0, 1]]
    write_frame(tmp_path, "kv1/NYUdata/NYU0001", color, depth, K, np.eye(3))
    write_split(tmp_path, ["kv1/NYUdata/NYU0001"], [])
    ds = SUNRGBD(config(SUNRGBDConfig, root=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    assert ds.scenes("train") == ["kv1/NYUdata/NYU0001"] and ds.scenes("val") == []
    s = ds.load("kv1/NYUdata/NYU0001")
    assert s["points"].shape == (640 * 480 - 56012, 3) and s["colors"].shape == s["points"].shape
    # no tilt: upright y is the depth, clamped at 8 m as the toolbox does
    assert np.isclose(s["points"][:, 1].min(), 1.057) and s["points"][:, 1].max() == np.float32(8.0)
    assert s["boxes"].shape == (0, 7) and s["box_labels"].shape == (0,)


def test_hand_written_frame_exact(tmp_path):
    mm = np.array([[1234, 9000], [0, 2000]], dtype=np.uint16)
    png = encode_depth(mm)
    assert png[0, 0] == (1234 << 3) and png[0, 1] == ((9000 << 3) & 0xFFFF) | (9000 >> 13) == 6465
    rgb = np.full((2, 2, 3), 200, np.uint8)
    K = [[2.0, 0, 1.5], [0, 4.0, 1.0], [0, 0, 1]]
    a = np.deg2rad(10.0)  # pitch about the camera x axis
    tilt = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    objects = [
        {"name": "chair", "polygon": [{"X": [3, 3, 0, 0], "Z": [1, 2, 2, 1], "Ymin": -1.0, "Ymax": 0.5}]},
        {"name": "table:occluded", "polygon": [{"X": [1, 0, 0, 1], "Z": [3, 3, 0, 0], "Ymin": 0, "Ymax": 1}]},
        {"name": "lamp", "polygon": [{"X": [0, 1, 1], "Z": [0, 0, 1], "Ymin": 0, "Ymax": 1}]},
        {"name": "bed", "polygon": [{"X": [0, 1], "Z": [0, 0], "Ymin": 0, "Ymax": 1}]},  # 2 corners: skipped, warned
        {"name": "wall", "polygon": [{"X": [0, 1, 1], "Z": [0, 0, 1], "Ymin": 0, "Ymax": 1}]},
        None, {"name": "sofa", "polygon": []},
    ]
    write_frame(tmp_path, "kv2/x/0001", rgb, png, K, tilt, objects)
    write_split(tmp_path, [], ["kv2/x/0001"])
    ds = SUNRGBD(config(SUNRGBDConfig, root=str(tmp_path), cache_dir=str(tmp_path / "c"), max_depth=0))
    s = ds.load(ds.scenes("val")[0])
    # pixels (row, col) with depth: (0,0) 1.234, (0,1) 9.0 (not clamped: max_depth 0), (1,1) 2.0
    rows, cols, z = np.array([0, 0, 1]), np.array([0, 1, 1]), np.array([1.234, 9.0, 2.0])
    cam = np.stack([(cols + 1 - 1.5) * z / 2.0, (rows + 1 - 1.0) * z / 4.0, z], -1)
    a_frame = cam @ tilt.T
    expected = np.stack([a_frame[:, 0], a_frame[:, 2], -a_frame[:, 1]], -1)
    np.testing.assert_allclose(s["points"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s["boxes"], [[1.5, 1.5, 0.25, 3, 1, 1.5, 0], [0.5, 1.5, -0.5, 3, 1, 1, np.pi / 2]],
                               atol=1e-6)
    np.testing.assert_array_equal(s["box_labels"], [3, 1])  # chair, table
    np.testing.assert_array_equal(s["tilt"], tilt)  # the last extrinsics file by name


def test_class_name_and_polygon_errors():
    assert class_name("night_stand") == "night_stand"
    assert class_name("chair:occluded") == "chair" and class_name("table_:_truncated") == "table"
    with pytest.raises(ValueError, match="where.*X, Z, Ymin, Ymax"):
        polygon_box({"X": [0, 1, 1]}, "where")


def test_missing_split_file_is_named(tmp_path):
    ds = SUNRGBD(config(SUNRGBDConfig, root=str(tmp_path), cache_dir=str(tmp_path / "c")))
    with pytest.raises(FileNotFoundError, match="allsplit.mat"):
        ds.scenes("train")


def test_corrupt_depth_png_is_named(tmp_path):
    write_frame(tmp_path, "kv1/a/1", np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint16),
                np.eye(3).tolist(), np.eye(3))
    write_split(tmp_path, ["kv1/a/1"], [])
    png = tmp_path / "SUNRGBD" / "kv1/a/1" / "depth" / "0001.png"
    png.write_bytes(png.read_bytes()[:20])
    ds = SUNRGBD(config(SUNRGBDConfig, root=str(tmp_path), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="0001.png"):
        ds.load("kv1/a/1")


def test_embedded_frames(small_sunrgbd):
    ds = small_sunrgbd
    assert len(ds.scenes("train")) == 4 and len(ds.scenes("val")) == 2
    assert not set(ds.scenes("train")) & set(ds.scenes("val"))
    n_boxes = 0
    for scene in ds.scenes("train") + ds.scenes("val"):
        s = ds.load(scene)
        pts = s["points"]
        assert pts.shape == (96 * 72, 3) and s["colors"].dtype == np.uint8
        # the tilt is undone: the floor is horizontal in the upright frame
        floor = pts[:, 2] < pts[:, 2].min() + 0.01
        assert floor.sum() > 0.05 * len(pts)
        assert not np.allclose(s["tilt"], np.eye(3), atol=0.05)  # the camera is tilted
        for box, label in zip(s["boxes"], s["box_labels"]):
            assert 0 <= label < 10 and np.all(box[3:6] > 0)
            c, h = box[:3], box[6]
            rot = np.array([[np.cos(h), np.sin(h)], [-np.sin(h), np.cos(h)]])
            loc = (pts[:, :2] - c[:2]) @ rot.T
            inside = (np.abs(loc[:, 0]) <= box[3] / 2 + 0.01) & (np.abs(loc[:, 1]) <= box[4] / 2 + 0.01) & \
                     (np.abs(pts[:, 2] - c[2]) <= box[5] / 2 + 0.01)
            assert inside.sum() >= 10
        n_boxes += len(s["boxes"])
    assert n_boxes >= 6


def test_the_raw_depth_folder_is_read_unless_the_hole_filled_one_is_asked_for(tmp_path):
    """The toolbox's readframeSUNRGBD and VoteNet read depth/; depth_bfx/ (the release's
    hole-filled copy, here with the hole filled at 2 m) only with depth_folder=depth_bfx."""
    raw = np.array([[1000, 0], [0, 3000]], dtype=np.uint16)  # two holes
    filled = np.array([[1000, 2000], [2000, 3000]], dtype=np.uint16)
    K = [[2.0, 0, 1.5], [0, 2.0, 1.5], [0, 0, 1]]
    d = write_frame(tmp_path, "kv1/y/0001", np.full((2, 2, 3), 90, np.uint8), encode_depth(raw), K, np.eye(3), [])
    (d / "depth_bfx").mkdir()
    Image.fromarray(encode_depth(filled)).save(d / "depth_bfx" / "0001.png")
    write_split(tmp_path, [], ["kv1/y/0001"])

    def points(**kw):
        ds = SUNRGBD(config(SUNRGBDConfig, root=str(tmp_path), cache_dir=str(tmp_path / "c"), **kw))
        return ds.load(ds.scenes("val")[0])["points"]

    assert len(points()) == 2 and sorted(points()[:, 1].round(3)) == [1.0, 3.0]  # upright y = camera z
    assert len(points(depth_folder="depth_bfx")) == 4
    (d / "depth" / "0001.png").unlink()
    (d / "depth").rmdir()
    with pytest.raises(FileNotFoundError, match=r"depth not found \(depth_bfx/ is there: "
                                                r"datasets.sunrgbd.depth_folder=depth_bfx reads it\)"):
        points()
    with pytest.raises(ValueError, match="depth_folder must be one of depth, depth_bfx, got 'raw'"):
        points(depth_folder="raw")
