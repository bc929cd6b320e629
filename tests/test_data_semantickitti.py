"""SemanticKITTI reader: real scans, labels, calib and poses of sequence 00, hand-written files
with known packed ids, and the embedded miniature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .data_helpers import config, sample, small_kitti  # noqa: F401
from harness.data.semantickitti import (IGNORE, SemanticKITTI, SemanticKITTIConfig, learning_map, read_calib,
                                        read_poses, read_scan)

SUB = ("semantickitti", "mmdet3d_subsample")
FULL = ("semantickitti", "full_scans")


def reader(root: Path, tmp_path: Path, **kw) -> SemanticKITTI:
    return SemanticKITTI(config(SemanticKITTIConfig, root=str(root), cache_dir=str(tmp_path / "cache"), **kw))


def test_real_subsample_with_labels(tmp_path):
    root = sample(*SUB)
    ds = reader(root, tmp_path)
    assert ds.scenes("train") == ["00/000000"]
    s = ds.load("00/000000")
    pts, rem = s["points"], s["remission"]
    assert pts.shape == (50, 3) and pts.dtype == np.float32
    np.testing.assert_allclose(pts.min(0), [-52.88521, -23.05587, 0.3277441], rtol=1e-6)
    np.testing.assert_allclose(pts.max(0), [72.67926, 31.58476, 2.083580], rtol=1e-6)
    assert rem.min() == 0.0 and np.isclose(rem.max(), 0.67) and len(np.unique(rem)) == 31
    rng = np.linalg.norm(pts, axis=1)
    assert np.isclose(rng.min(), 9.6057, atol=1e-4) and np.isclose(rng.max(), 74.4769, atol=1e-4)
    raw, counts = np.unique(s["semantic_raw"], return_counts=True)
    assert dict(zip(raw.tolist(), counts.tolist())) == {0: 2, 50: 25, 52: 1, 70: 17, 71: 3, 80: 2}
    train, counts = np.unique(s["semantic"], return_counts=True)
    # unlabeled + other-structure ignored; building 12, vegetation 14, trunk 15, pole 17
    assert dict(zip(train.tolist(), counts.tolist())) == {IGNORE: 3, 12: 25, 14: 17, 15: 3, 17: 2}
    assert s["instance"].max() == 0 and s["instance_label"].tolist() == [IGNORE]
    grey = np.rint(rem * 255).astype(np.uint8)
    np.testing.assert_array_equal(s["colors"], np.stack([grey] * 3, -1))
    np.testing.assert_array_equal(s["pose"], np.eye(4))  # no poses.txt in this tree


def test_real_full_scans_calib_and_poses(tmp_path):
    root = sample(*FULL)
    ds = reader(root, tmp_path)
    assert ds.scenes("train") == ["00/000000", "00/000001"]
    facts = {"00/000000": (124668, [-78.08739, -55.72341, -11.55654], [77.96733, 44.87861, 2.825341], 10388),
             "00/000001": (124605, [-79.16062, -54.58509, -11.29553], [79.74147, 51.21913, 2.816828], 10383)}
    for scene, (n, lo, hi, zeros) in facts.items():
        s = ds.load(scene)
        assert len(s["points"]) == n and "semantic" not in s
        np.testing.assert_allclose(s["points"].min(0), lo, rtol=1e-6)
        np.testing.assert_allclose(s["points"].max(0), hi, rtol=1e-6)
        assert int((s["remission"] == 0).sum()) == zeros and np.isclose(s["remission"].max(), 0.99)
    d = root / "dataset" / "sequences" / "00"
    tr = read_calib(d / "calib.txt")
    assert sorted(tr) == ["P0", "P1", "P2", "P3", "Tr"]
    np.testing.assert_allclose(tr["Tr"][0, :2], [4.276802385584e-04, -9.999672484946e-01])
    assert read_poses(d / "poses.txt").shape == (4541, 4, 4)
    np.testing.assert_allclose(ds.load("00/000000")["pose"], np.eye(4), atol=1e-6)
    step = ds.load("00/000001")["pose"][:3, 3]
    assert np.isclose(step[0], 0.673, atol=0.002) and np.linalg.norm(step[1:]) < 0.03  # about 0.673 m forward
    with pytest.raises(FileNotFoundError, match="08"):  # the val split (sequence 08) is absent here
        ds.scenes("val")


def write_sequence(root: Path, seq: str, scan: np.ndarray, label=None) -> Path:
    d = root / "dataset" / "sequences" / seq
    (d / "velodyne").mkdir(parents=True, exist_ok=True)
    scan.astype("<f4").tofile(d / "velodyne" / "000000.bin")
    if label is not None:
        (d / "labels").mkdir(parents=True, exist_ok=True)
        np.asarray(label, "<u4").tofile(d / "labels" / "000000.label")
    return d


def test_hand_written_label_exact(tmp_path):
    scan = np.arange(24, dtype=np.float32).reshape(6, 4) / 10
    label = [(5 << 16) | 10, 40, (7 << 16) | 252, 1, 99, (3 << 16) | 44]
    write_sequence(tmp_path, "08", scan, label)
    ds = reader(tmp_path, tmp_path)
    assert ds.scenes("val") == ["08/000000"]
    s = ds.load("08/000000")
    np.testing.assert_array_equal(s["points"], scan[:, :3])
    np.testing.assert_array_equal(s["remission"], scan[:, 3])
    np.testing.assert_array_equal(s["semantic_raw"], [10, 40, 252, 1, 99, 44])
    np.testing.assert_array_equal(s["semantic"], [0, 8, 0, IGNORE, IGNORE, 9])  # moving-car -> car
    np.testing.assert_array_equal(s["instance"], [1, 0, 2, 0, 0, 0])  # parking is stuff: no instance
    np.testing.assert_array_equal(s["instance_label"], [IGNORE, 0, 0])


def test_root_may_be_the_release_folder_dataset_or_sequences(tmp_path):
    write_sequence(tmp_path, "08", np.zeros((2, 4), np.float32), [40, 40])
    for root in (tmp_path, tmp_path / "dataset", tmp_path / "dataset" / "sequences"):
        assert reader(root, tmp_path).scenes("val") == ["08/000000"], root
    with pytest.raises(FileNotFoundError, match="dataset/ itself, or sequences/ itself"):
        reader(tmp_path / "dataset" / "sequences" / "08", tmp_path)


def test_learning_map_covers_the_release_ids():
    raw = np.array([0, 1, 10, 11, 13, 15, 16, 18, 20, 30, 31, 32, 40, 44, 48, 49, 50, 51, 52, 60, 70, 71, 72, 80,
                    81, 99, 252, 253, 254, 255, 256, 257, 258, 259])
    expected = [-100, -100, 0, 1, 4, 2, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, -100, 8, 14, 15, 16, 17, 18, -100,
                0, 6, 5, 7, 4, 4, 3, 4]
    np.testing.assert_array_equal(learning_map(raw), expected)


def test_truncated_bin_and_label_mismatch(tmp_path):
    d = write_sequence(tmp_path, "00", np.zeros((4, 4)), [0, 0, 0])
    with pytest.raises(ValueError, match=r"labels/000000\.label: 3 labels, the scan has 4"):
        reader(tmp_path, tmp_path).load("00/000000")
    data = (d / "velodyne" / "000000.bin").read_bytes()
    (d / "velodyne" / "000000.bin").write_bytes(data[:-6])
    with pytest.raises(ValueError, match=r"000000\.bin: truncated.*not a multiple of 16"):
        read_scan(d / "velodyne" / "000000.bin")


def test_missing_label_file_when_labels_exist(tmp_path):
    d = write_sequence(tmp_path, "00", np.zeros((2, 4)), [0, 0])
    np.zeros((2, 4), "<f4").tofile(d / "velodyne" / "000001.bin")
    with pytest.raises(FileNotFoundError, match=r"000001\.label"):
        reader(tmp_path, tmp_path).load("00/000001")


def test_embedded_sequences(small_kitti):
    ds = small_kitti
    assert ds.sequences("train") == ["00"] and ds.sequences("val") == ["08"]
    assert ds.scenes("train") == ["00/000000", "00/000001", "00/000002"]
    assert ds.scenes("val") == ["08/000000", "08/000001"]
    classes = set()
    prev = None
    for scene in ds.scenes("train"):
        s = ds.load(scene)
        assert len(s["points"]) > 1000 and s["colors"].shape == (len(s["points"]), 3)
        assert np.all(np.round(s["remission"] * 100) == np.round(s["remission"] * 100, 3))  # steps of 0.01
        classes |= set(np.unique(s["semantic"]).tolist())
        if prev is None:
            np.testing.assert_allclose(s["pose"], np.eye(4), atol=1e-6)
        else:
            assert 0.8 < np.linalg.norm(s["pose"][:3, 3] - prev[:3, 3]) < 1.0  # about 0.9 m per scan
        prev = s["pose"]
    names = {ds.class_names[c] for c in classes if c >= 0}
    assert {"road", "sidewalk", "building", "car"} <= names
    # the scans are in the sensor frame: the road is about 1.73 m below the sensor
    road = s["points"][s["semantic"] == ds.class_names.index("road")]
    assert abs(np.median(road[:, 2]) + 1.73) < 0.05


def test_embedded_default_density(tmp_path):
    """The default miniature: 30 + 10 scans of about 15-25k points (not too many to fine-tune fast)."""
    from harness.data.semantickitti_embedded import generate

    generate(tmp_path, {"seed": 0, "train_scans": 2, "val_scans": 1, "beams": 32, "azimuth_steps": 768})
    for f in sorted((tmp_path / "dataset" / "sequences").rglob("*.bin")):
        assert 15000 <= f.stat().st_size // 16 <= 26000, f
