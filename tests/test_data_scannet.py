"""ScanNet reader on the real scene0470_00 (mesh + label mesh) and on the embedded miniature."""

from __future__ import annotations

import numpy as np
import pytest

from .data_helpers import config, sample, small_scannet  # noqa: F401
from harness.data.scannet import IGNORE, ScanNet, ScanNetConfig


def test_real_scene(tmp_path):
    root = sample("scannet")
    sample("scannet", "scans", "scene0470_00", "scene0470_00_vh_clean_2.labels.ply")
    ds = ScanNet(config(ScanNetConfig, root=str(root), cache_dir=str(tmp_path)))
    s = ds.load("scene0470_00")
    assert s["points"].shape == (67465, 3) and s["colors"].shape == (67465, 3)
    np.testing.assert_allclose(s["points"].min(0), [-0.002913897, -0.0003485714, -0.006196951], rtol=1e-5)
    np.testing.assert_allclose(s["points"].max(0), [3.489222, 2.851230, 1.366077], rtol=1e-6)
    assert s["colors"].min(0).tolist() == [4, 5, 3] and s["colors"].max(0).tolist() == [255, 255, 255]
    nyu, counts = np.unique(s["nyu40"], return_counts=True)
    assert dict(zip(nyu.tolist(), counts.tolist())) == {0: 767, 1: 24353, 2: 14939, 5: 15712, 7: 2572, 8: 2777,
                                                        9: 1924, 30: 3172, 37: 251, 39: 998}
    train, counts = np.unique(s["semantic"], return_counts=True)
    # wall 0, floor 1, chair 4, table 6, door 7, window 8, otherfurniture 19; whiteboard and bag ignored
    assert dict(zip(train.tolist(), counts.tolist())) == {IGNORE: 767 + 3172 + 251, 0: 24353, 1: 14939, 4: 15712,
                                                          6: 2572, 7: 2777, 8: 1924, 19: 998}
    assert "instance" not in s  # no aggregation.json in the sample
    with pytest.raises(FileNotFoundError, match="scannetv2_train.txt"):
        ds.scenes("train")


def test_embedded_scene(small_scannet):
    ds = small_scannet
    assert ds.scenes("train") == ["scene0000_00", "scene0001_00"] and ds.scenes("val") == ["scene0002_00"]
    assert (ds.root / "scannetv2-labels.combined.tsv").is_file()
    s = ds.load("scene0002_00")
    n = len(s["points"])
    assert s["semantic"].shape == (n,) and s["instance"].shape == (n,)
    labelled = s["instance"] > 0
    np.testing.assert_array_equal(s["instance_label"][s["instance"][labelled]], s["semantic"][labelled])
    assert len(s["boxes"]) == len(s["box_labels"]) > 0
    assert set(s["box_labels"].tolist()) <= set(ds.instance_classes)
    assert ds.raw_to_nyu40()["couch"] == 6


def test_a_scene_without_alignment_is_read_unaligned_with_a_warning(small_scannet, tmp_path, caplog):
    import logging
    import shutil

    root = tmp_path / "release"
    shutil.copytree(small_scannet.root, root, ignore=shutil.ignore_patterns("*.sens", "frames"))
    (root / "scans" / "scene0002_00" / "scene0002_00.txt").unlink()
    ds = ScanNet(config(ScanNetConfig, root=str(root), cache_dir=str(tmp_path / "cache")))
    with caplog.at_level(logging.WARNING, logger="harness.data.scannet"):
        np.testing.assert_array_equal(ds.axis_alignment("scene0002_00"), np.eye(4))
    assert "scannet.no_alignment scene=scene0002_00" in caplog.text
    assert not np.allclose(small_scannet.axis_alignment("scene0002_00"), np.eye(4))  # the original has one
    with pytest.raises(FileNotFoundError, match=r"looks like the scans/ folder itself, give its parent"):
        ScanNet(config(ScanNetConfig, root=str(root / "scans"), cache_dir=str(tmp_path / "cache"))).scenes("train")


def test_semantic_labels_come_from_the_aggregation_and_label_map_as_the_benchmark_exporter(small_scannet, tmp_path,
                                                                                           caplog):
    """The released labels.ply holds ids 50 and 149 in a few scenes where the aggregation and
    the tsv say 39 (otherfurniture, train id 19): the benchmark's ground truth is the latter."""
    import logging
    import shutil

    from harness.data.ply import read_ply, write_ply
    from harness.data.scannet import LABEL_TSV

    root = tmp_path / "release"
    shutil.copytree(small_scannet.root, root, ignore=shutil.ignore_patterns("*.sens", "frames"))
    scene = "scene0002_00"
    ref = small_scannet.load(scene)
    k = int(np.flatnonzero(ref["instance_label"] >= 0)[1])  # an object of a benchmark class
    verts = ref["instance"] == k
    path = root / "scans" / scene / f"{scene}_vh_clean_2.labels.ply"
    mesh = read_ply(path)
    faces = mesh.pop("faces", None)
    mesh["label"] = np.where(verts, 50, mesh["label"]).astype(mesh["label"].dtype)
    write_ply(path, mesh, faces)
    ds = ScanNet(config(ScanNetConfig, root=str(root), cache_dir=str(tmp_path / "cache")))
    s = ds.load(scene)
    np.testing.assert_array_equal(s["semantic"], ref["semantic"])
    assert (s["semantic"][verts] == ref["instance_label"][k]).all()
    (root / LABEL_TSV).unlink()  # without the label map: the label mesh's ids, 50 ignored, and a warning
    with caplog.at_level(logging.WARNING, logger="harness.data.scannet"):
        s = ScanNet(config(ScanNetConfig, root=str(root), cache_dir=str(tmp_path / "cache2"))).load(scene)
    assert (s["semantic"][verts] == -100).all() and (s["semantic"][~verts] == ref["semantic"][~verts]).all()
    assert "scannet.no_label_map" in caplog.text
