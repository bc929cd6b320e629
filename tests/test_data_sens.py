"""ScanNet .sens: round trip of known frames, truncation, invalid poses, and the frames path of
the ScanNet reader (embedded .sens exported into the cache)."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
from PIL import Image

from .data_helpers import small_scannet  # noqa: F401
from harness.data.sens import SensFile, SensHeader, encode_color, export_sens, read_sens, write_sens


def known_frames(n=3, invalid=()):
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        color = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        depth = rng.integers(0, 5000, (3, 4), dtype=np.uint16)
        pose = np.eye(4)
        pose[:3, 3] = [i * 0.1, -0.25, 1.5]
        if i in invalid:
            pose = np.full((4, 4), -np.inf)
        frames.append((color, depth, pose))
    return frames


def header(color_compression=0):
    K = np.array([[5.0, 0, 3.5, 0], [0, 5.0, 2.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return SensHeader(sensor_name="StructureSensor", intrinsic_color=K, intrinsic_depth=K / 2 + np.diag([0, 0, .5, .5]),
                      color_compression=color_compression, depth_compression=1, depth_shift=1000.0)


def test_round_trip_is_exact(tmp_path):
    frames = known_frames()
    path = write_sens(tmp_path / "s.sens", header(0), frames)
    h, decoded = read_sens(path)
    assert h.version == 4 and h.sensor_name == "StructureSensor" and h.num_frames == 3
    assert (h.color_width, h.color_height, h.depth_width, h.depth_height) == (8, 6, 4, 3)
    assert h.color_compression == 0 and h.depth_compression == 1 and h.depth_shift == 1000.0
    np.testing.assert_array_equal(h.intrinsic_color, header().intrinsic_color)
    for (color, depth, pose), f in zip(frames, decoded):
        np.testing.assert_array_equal(f.color(h), color)
        np.testing.assert_array_equal(f.depth(h), depth)
        np.testing.assert_array_equal(f.pose, pose.astype(np.float32))
        assert f.valid


def test_jpeg_colour_is_stored_and_exported_byte_for_byte(tmp_path):
    frames = known_frames(2)
    path = write_sens(tmp_path / "s.sens", header(2), frames)
    h, decoded = read_sens(path)
    for (color, _, _), f in zip(frames, decoded):
        assert f.color_data == encode_color(color, 2)
        assert f.color(h).shape == color.shape
    summary = export_sens(path, tmp_path / "out", frame_skip=1)
    assert summary["exported"] == 2
    assert (tmp_path / "out" / "color" / "1.jpg").read_bytes() == decoded[1].color_data
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "depth" / "1.png")), frames[1][1])
    np.testing.assert_allclose(np.loadtxt(tmp_path / "out" / "pose" / "1.txt"), frames[1][2], atol=1e-6)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "out" / "intrinsic" / "intrinsic_color.txt"),
                               header().intrinsic_color, atol=1e-6)


def test_truncated_sens_names_file_and_frame(tmp_path):
    path = write_sens(tmp_path / "s.sens", header(0), known_frames())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    sens = SensFile(path)
    with pytest.raises(ValueError, match=r"s\.sens: truncated \.sens: the depth data of frame 2"):
        list(sens.frames())
    path.write_bytes(data[:30])
    with pytest.raises(ValueError, match=r"s\.sens: truncated"):
        SensFile(path)


def test_wrong_version_is_an_error(tmp_path):
    path = tmp_path / "x.sens"
    path.write_bytes(struct.pack("<I", 3) + b"\0" * 100)
    with pytest.raises(ValueError, match="version field reads 3"):
        SensFile(path)


def test_invalid_pose_frames_are_skipped_and_counted(tmp_path, caplog):
    path = write_sens(tmp_path / "s.sens", header(0), known_frames(5, invalid=(1, 3)))
    with caplog.at_level(logging.WARNING, logger="harness.data.sens"):
        summary = export_sens(path, tmp_path / "out", frame_skip=1)
    assert summary["exported"] == 3 and summary["skipped_invalid_pose"] == [1, 3]
    assert sorted(int(p.stem) for p in (tmp_path / "out" / "pose").glob("*.txt")) == [0, 2, 4]
    assert any("skipped=2" in r.getMessage() and "s.sens" in r.getMessage() for r in caplog.records)
    summary = export_sens(path, tmp_path / "skip2", frame_skip=2)  # frames 0, 2, 4
    assert summary["exported"] == 3
    summary = export_sens(path, tmp_path / "skip3", frame_skip=3)  # frames 0, 3 (3 is invalid)
    assert summary["exported"] == 1 and summary["skipped_invalid_pose"] == [3]


def test_scannet_frames_come_from_the_sens(small_scannet, caplog):
    ds = small_scannet
    scene = ds.scenes("train")[0]
    sens = ds.scene_dir(scene) / f"{scene}.sens"
    assert sens.is_file() and not (ds.root / "frames").exists()
    h, raw = read_sens(sens)
    assert h.num_frames == 5 and sum(not f.valid for f in raw) == 1  # one lost-tracking frame
    with caplog.at_level(logging.WARNING, logger="harness.data.sens"):
        refs = ds.frames(scene)
    assert len(refs) == 4 and all(raw[r.index].valid for r in refs)
    frame = refs[0].load()
    assert frame.color.shape == (60, 80, 3) and frame.depth.shape == (30, 40)
    np.testing.assert_allclose(frame.depth, raw[refs[0].index].depth(h) / 1000.0)
    np.testing.assert_allclose(frame.pose, raw[refs[0].index].pose, atol=1e-6)
    exported = ds.frames_dir(scene)
    stamp = (exported / "export.json").stat().st_mtime_ns
    assert len(ds.frames(scene)) == 4 and (exported / "export.json").stat().st_mtime_ns == stamp  # exported once
    # the other scenes have no invalid frame
    other = ds.scenes("train")[1]
    assert len(ds.frames(other)) == 4
