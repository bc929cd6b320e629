"""S3DIS reader: hand-written rooms in the official layout (no real room could be found) and the
embedded miniature."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from .data_helpers import config, small_s3dis  # noqa: F401
from harness.data.s3dis import IGNORE, RELEASE_DIR, S3DIS, S3DISConfig, read_points_txt


def write_room(base: Path, area: int, room: str, files: dict) -> Path:
    d = base / RELEASE_DIR / f"Area_{area}" / room / "Annotations"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


@pytest.fixture
def three_point_release(tmp_path):
    write_room(tmp_path, 1, "office_1", {
        "chair_1.txt": "0.500 0.250 0.125 255 0 7\n",
        "ceiling_1.txt": "1.000 2.000 3.000 10 20 30\n",
        "stairs_1.txt": "-4.250 5.500 -0.010 0 128 255\n",
    })
    write_room(tmp_path, 5, "hallway_1", {"floor_1.txt": "0 0 0 1 2 3\n"})
    return tmp_path


def reader(root: Path, **kw) -> S3DIS:
    return S3DIS(config(S3DISConfig, root=str(root), cache_dir=str(root / "cache"), **kw))


def test_three_point_room_exact(three_point_release):
    ds = reader(three_point_release, train_areas=[1])
    assert ds.scenes("train") == ["Area_1/office_1"]
    assert ds.scenes("val") == ["Area_5/hallway_1"]
    s = ds.load("Area_1/office_1")
    # files in natural order: ceiling_1, chair_1, stairs_1 (stairs ignored, as CSC, by default)
    np.testing.assert_array_equal(s["points"], np.array([[1, 2, 3], [0.5, 0.25, 0.125], [-4.25, 5.5, -0.01]],
                                                        np.float32))
    assert s["points"].dtype == np.float32 and s["colors"].dtype == np.uint8
    np.testing.assert_array_equal(s["colors"], [[10, 20, 30], [255, 0, 7], [0, 128, 255]])
    np.testing.assert_array_equal(s["semantic"], [0, 8, IGNORE])
    np.testing.assert_array_equal(s["instance"], [1, 2, 0])
    np.testing.assert_array_equal(s["instance_label"], [IGNORE, 0, 8])
    assert s["semantic"].dtype == np.int64 and s["instance"].dtype == np.int64
    assert ds.num_classes == 13 and ds.ignore_index == -100 and set(ds.tasks) == {"semseg", "instseg"}
    # PointNet's protocol: stairs are clutter (id 12), an instance of their own
    s = reader(three_point_release, train_areas=[1], stairs="clutter").load("Area_1/office_1")
    np.testing.assert_array_equal(s["semantic"], [0, 8, 12])
    np.testing.assert_array_equal(s["instance"], [1, 2, 3])
    np.testing.assert_array_equal(s["instance_label"], [IGNORE, 0, 8, 12])
    with pytest.raises(ValueError, match="datasets.s3dis.stairs must be one of ignore, clutter, got 'floor'"):
        reader(three_point_release, stairs="floor")


def test_root_may_be_the_release_parent_or_folder(three_point_release):
    a = reader(three_point_release, train_areas=[1])
    b = reader(three_point_release / RELEASE_DIR, train_areas=[1])
    assert a.root == b.root


def test_natural_order_of_instances(tmp_path):
    write_room(tmp_path, 1, "office_1", {f"chair_{k}.txt": f"{k} 0 0 0 0 0\n" for k in (1, 2, 10)})
    s = reader(tmp_path, train_areas=[1]).load("Area_1/office_1")
    np.testing.assert_array_equal(s["points"][:, 0], [1, 2, 10])


def test_malformed_line_is_skipped_with_file_and_line(tmp_path, caplog):
    d = write_room(tmp_path, 5, "hallway_6", {
        "ceiling_1.txt": "1 2 3 4 5 6\n1 2 3 4 5\n7 8 9 10 11 12\n",
        "floor_1.txt": "0 0 0 0 0 0\n",
    })
    with caplog.at_level(logging.WARNING, logger="harness.data.s3dis"):
        s = reader(tmp_path).load("Area_5/hallway_6")
    assert len(s["points"]) == 3
    np.testing.assert_array_equal(s["points"][:2], [[1, 2, 3], [7, 8, 9]])
    msg = "\n".join(r.getMessage() for r in caplog.records)
    assert str(d / "ceiling_1.txt") in msg and "line=2" in msg


def test_garbled_character_line_is_skipped(tmp_path):
    path = tmp_path / "ceiling_1.txt"
    path.write_bytes(b"1 2 3 4 5 6\n22.592 6.733 3.065 1\x10 5 6\n2 2 2 2 2 2\n")
    np.testing.assert_array_equal(read_points_txt(path), [[1, 2, 3, 4, 5, 6], [2, 2, 2, 2, 2, 2]])


def test_mostly_unreadable_file_is_an_error(tmp_path):
    write_room(tmp_path, 1, "office_1", {"wall_1.txt": "x y z\n1 2\n3 4 5 6 7 8\nnot numbers at all\n"})
    with pytest.raises(ValueError, match=r"wall_1\.txt.*3 of 4 lines"):
        reader(tmp_path, train_areas=[1]).load("Area_1/office_1")


def test_missing_split_names_the_area(three_point_release):
    ds = reader(three_point_release, train_areas=[1, 2])
    with pytest.raises(FileNotFoundError, match="Area_2"):
        ds.scenes("train")


def test_unknown_class_is_an_error(tmp_path):
    write_room(tmp_path, 1, "office_1", {"lamp_1.txt": "0 0 0 0 0 0\n"})
    with pytest.raises(ValueError, match="unknown S3DIS class 'lamp'"):
        reader(tmp_path, train_areas=[1]).load("Area_1/office_1")


def test_embedded_layout_and_labels(small_s3dis):
    ds = small_s3dis
    root = ds.root
    assert root.name == RELEASE_DIR
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [f"Area_{a}" for a in range(1, 7)]
    assert all(s.startswith("Area_5/") for s in ds.scenes("val"))
    assert not any(s.startswith("Area_5/") for s in ds.scenes("train"))
    seen = set()
    for scene in ds.scenes("train") + ds.scenes("val"):
        s = ds.load(scene)
        n = len(s["points"])
        assert s["points"].shape == (n, 3) and s["colors"].shape == (n, 3)
        assert s["semantic"].min() >= 0 and s["semantic"].max() < 13
        # every instance has one class: instance_label[instance] == semantic
        np.testing.assert_array_equal(s["instance_label"][s["instance"]], s["semantic"])
        assert s["instance"].min() == 1 and s["instance"].max() == len(s["instance_label"]) - 1
        seen |= set(np.unique(s["semantic"]).tolist())
        # the whole-room file holds the same points as the annotation files
        room_txt = root / scene / f"{scene.split('/')[1]}.txt"
        whole = read_points_txt(room_txt)[:, :3].astype(np.float32)
        np.testing.assert_array_equal(whole[np.lexsort(whole.T)], s["points"][np.lexsort(s["points"].T)])
    assert {0, 1, 2, 6} <= seen  # ceiling, floor, wall, door in every room


def test_embedded_is_deterministic(small_s3dis, tmp_path):
    from harness.data.s3dis_embedded import generate

    other = tmp_path / "again"
    generate(other, {"seed": 0, "rooms_per_area": [1, 1, 1, 1, 1, 1], "density": 120.0})

    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.txt")):
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
        return h.hexdigest()

    assert digest(other / RELEASE_DIR) == digest(small_s3dis.root)
