"""Shared helpers for the dataset-reader tests: the real sample files and small embedded datasets.

Real release files live in ``<repo>/../shared/samples`` (override with HARNESS_SAMPLES); they are
never copied into this repository, and tests that need them skip, saying so, where absent.
The embedded fixtures generate reduced miniatures once per session into a temporary cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def samples_dir() -> Path:
    return Path(os.environ.get("HARNESS_SAMPLES", REPO.parent / "shared" / "samples"))


def sample(*parts: str) -> Path:
    """Path of a real sample file; skips the test (saying why) when it is absent."""
    path = samples_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample {path} not available (set HARNESS_SAMPLES or provide ../shared/samples)")
    return path


_MEMO: dict = {}  # one instance per session even when several modules import a fixture


def _once(name: str, make):
    if name not in _MEMO:
        _MEMO[name] = make()
    return _MEMO[name]


def config(schema: type, **fields):
    cfg = OmegaConf.structured(schema)
    for key, value in fields.items():
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


@pytest.fixture(scope="session")
def small_s3dis(tmp_path_factory):
    from harness.data.s3dis import S3DIS, S3DISConfig

    return _once("s3dis", lambda: S3DIS(config(
        S3DISConfig, cache_dir=str(tmp_path_factory.mktemp("s3dis-cache")),
        **{"embedded.rooms_per_area": [1, 1, 1, 1, 1, 1], "embedded.density": 120.0})))


@pytest.fixture(scope="session")
def small_sunrgbd(tmp_path_factory):
    from harness.data.sunrgbd import SUNRGBD, SUNRGBDConfig

    return _once("sunrgbd", lambda: SUNRGBD(config(
        SUNRGBDConfig, cache_dir=str(tmp_path_factory.mktemp("sunrgbd-cache")),
        **{"embedded.train_frames": 4, "embedded.val_frames": 2, "embedded.image_size": [96, 72]})))


@pytest.fixture(scope="session")
def small_kitti(tmp_path_factory):
    from harness.data.semantickitti import SemanticKITTI, SemanticKITTIConfig

    return _once("kitti", lambda: SemanticKITTI(config(
        SemanticKITTIConfig, cache_dir=str(tmp_path_factory.mktemp("kitti-cache")),
        **{"embedded.train_scans": 3, "embedded.val_scans": 2, "embedded.beams": 16, "embedded.azimuth_steps": 256})))


# The small embedded ScanNet of the tests (the tiny end-to-end sweeps use it too, same cache).
SMALL_SCANNET = {"embedded.train_scenes": 2, "embedded.val_scenes": 1, "embedded.frames_per_scene": 4,
                 "embedded.mesh_spacing": 0.1, "embedded.depth_size": [40, 30], "embedded.color_size": [80, 60]}


@pytest.fixture(scope="session")
def small_scannet(tmp_path_factory):
    from harness.data.scannet import ScanNet, ScanNetConfig

    return _once("scannet", lambda: ScanNet(config(
        ScanNetConfig, cache_dir=str(tmp_path_factory.mktemp("scannet-cache")), **SMALL_SCANNET)))


@pytest.fixture(scope="session")
def cache_dir(small_scannet):
    """The cache directory holding the small embedded ScanNet."""
    return Path(small_scannet.cfg.cache_dir)
