"""data prepare: memory-mapped cache equal to the reader's output, resumable after an interruption,
validation naming the first missing or corrupt file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from .data_helpers import config, small_s3dis, small_scannet  # noqa: F401
from harness.data.prepare import cache_key, prepare, prepare_command, prepared, prepared_dir
from harness.data.s3dis import S3DIS, S3DISConfig


def test_prepared_matches_the_reader(small_s3dis):
    ds = small_s3dis
    p = prepared(ds)
    assert p.scenes("train") == ds.scenes("train") and p.scenes("val") == ds.scenes("val")
    assert p.class_names == ds.class_names and p.num_classes == 13 and p.ignore_index == -100
    assert p.instance_classes == ds.instance_classes and p.tasks == ds.tasks
    scene = ds.scenes("val")[0]
    got, want = p.load(scene), ds.load(scene)
    assert isinstance(got["points"], np.memmap)
    assert set(got) == set(want) and got["scene"] == scene
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value)


def test_prepared_keeps_the_readers_other_methods(small_scannet):
    p = prepared(small_scannet, splits=("val",))
    scene = p.scenes("val")[0]
    assert len(p.frames(scene)) == 4 and p.has_frames


def _tree(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_interrupted_prepare_resumes_to_the_same_cache(small_s3dis, tmp_path, monkeypatch):
    release = str(small_s3dis.root)
    whole = S3DIS(config(S3DISConfig, root=release, cache_dir=str(tmp_path / "a")))
    prepare(whole)

    first = S3DIS(config(S3DISConfig, root=release, cache_dir=str(tmp_path / "b")))
    calls = {"n": 0}
    original = S3DIS.load

    def flaky(self, scene):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return original(self, scene)

    monkeypatch.setattr(S3DIS, "load", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(first)
    monkeypatch.setattr(S3DIS, "load", original)
    d = prepared_dir(first)
    man = json.loads((d / "manifest.json").read_text())
    assert man["complete"] is False and len(man["scenes"]) == 3
    assert not list((d / "scenes").glob(".*"))  # no half-written scene left behind

    again = S3DIS(config(S3DISConfig, root=release, cache_dir=str(tmp_path / "b")))
    resumed = prepare(again)
    assert resumed.name == prepared_dir(whole).name
    assert _tree(resumed) == _tree(prepared_dir(whole))


def test_cache_key_follows_root_config_and_version(small_s3dis, tmp_path):
    release = str(small_s3dis.root)
    a = S3DIS(config(S3DISConfig, root=release, cache_dir=str(tmp_path / "x")))
    b = S3DIS(config(S3DISConfig, root=release, cache_dir=str(tmp_path / "y")))
    c = S3DIS(config(S3DISConfig, root=release, cache_dir=str(tmp_path / "x"), val_area=6))
    assert cache_key(a) == cache_key(b) != cache_key(c)
    b.version = "999"
    assert cache_key(a) != cache_key(b)


def _kitti_release(root: Path) -> Path:
    for seq in ("00", "08"):
        d = root / "dataset" / "sequences" / seq
        (d / "velodyne").mkdir(parents=True)
        (d / "labels").mkdir()
        for i in range(2):
            np.ones((3, 4), "<f4").tofile(d / "velodyne" / f"{i:06d}.bin")
            np.full(3, 40, "<u4").tofile(d / "labels" / f"{i:06d}.label")
    return root


def test_prepare_command_names_the_first_missing_file(tmp_path):
    root = _kitti_release(tmp_path / "kitti")
    missing = root / "dataset" / "sequences" / "00" / "labels" / "000001.label"
    missing.unlink()
    console = Console(file=io.StringIO())
    with pytest.raises(FileNotFoundError, match=str(missing)):
        prepare_command("semantickitti", str(root), str(tmp_path / "cache"), console=console)
    np.full(3, 40, "<u4").tofile(missing)
    empty = root / "dataset" / "sequences" / "08" / "velodyne" / "000000.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        prepare_command("semantickitti", str(root), str(tmp_path / "cache"), console=console)
    empty.write_bytes(b"\0" * 20)  # corrupt: not whole points; found while converting
    with pytest.raises(ValueError, match="000000.bin: truncated"):
        prepare_command("semantickitti", str(root), str(tmp_path / "cache"), console=console)


def test_prepare_command_summary(tmp_path):
    root = _kitti_release(tmp_path / "kitti")
    out = io.StringIO()
    summary = prepare_command("semantickitti", str(root), str(tmp_path / "cache"), console=Console(file=out, width=200))
    assert summary["scenes"] == {"train": 2, "val": 2} and summary["points"] == 12
    assert "prepared semantickitti" in out.getvalue()
    ds_dir = Path(summary["directory"])
    assert json.loads((ds_dir / "manifest.json").read_text())["complete"] is True
    again = prepare_command("semantickitti", str(root), str(tmp_path / "cache"), console=Console(file=io.StringIO()))
    assert again["directory"] == summary["directory"]


def test_prepare_command_exports_scannet_frames(tmp_path):
    overrides = {"embedded": {"train_scenes": 1, "val_scenes": 1, "frames_per_scene": 2, "mesh_spacing": 0.15,
                              "depth_size": [20, 16], "color_size": [40, 32]}}
    summary = prepare_command("scannet", None, str(tmp_path), overrides=overrides, console=Console(file=io.StringIO()))
    assert summary["scenes"] == {"train": 1, "val": 1}
    assert summary["frames"] == 2  # scene0000_00's stream also holds one invalid frame, skipped


def test_scannet_without_sens_is_found_before_converting_and_no_frames_prepares_it(tmp_path):
    import shutil

    overrides = {"embedded": {"train_scenes": 1, "val_scenes": 1, "frames_per_scene": 2, "mesh_spacing": 0.15,
                              "depth_size": [20, 16], "color_size": [40, 32]}}
    made = prepare_command("scannet", None, str(tmp_path / "gen"), overrides=overrides,
                           console=Console(file=io.StringIO()))
    root = tmp_path / "release"
    shutil.copytree(made["root"], root)
    for sens in root.rglob("*.sens"):  # a download without the RGB-D streams (the largest part)
        sens.unlink()
    with pytest.raises(FileNotFoundError, match=r"no frames for scene0000_00: .*scene0000_00\.sens .*--no-frames"):
        prepare_command("scannet", str(root), str(tmp_path / "cache"), console=Console(file=io.StringIO()))
    assert not list((tmp_path / "cache").rglob("manifest.json")), "nothing converted before the check"
    summary = prepare_command("scannet", str(root), str(tmp_path / "cache"), console=Console(file=io.StringIO()),
                              frames=False)
    assert summary["scenes"] == {"train": 1, "val": 1} and summary["frames"] == 0


def test_scenes_without_labels_are_reported(tmp_path):
    root = _kitti_release(tmp_path / "kitti")
    import shutil

    shutil.rmtree(root / "dataset" / "sequences" / "08" / "labels")  # a sequence released without labels
    out = io.StringIO()
    summary = prepare_command("semantickitti", str(root), str(tmp_path / "cache"), console=Console(file=out, width=300))
    assert summary["unlabelled"] == {"val": 2}
    assert "2 of 2 val scenes have no semantic labels" in out.getvalue()
