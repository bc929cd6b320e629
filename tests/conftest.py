"""Shared fixtures: a small embedded ScanNet in a session cache, the real samples' location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("HARNESS_SAMPLES", REPO.parent / "shared" / "samples"))


def samples_dir(*parts: str) -> Path:
    """A path under the real sample files; skips the test (saying why) when they are absent."""
    path = SAMPLES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample files not available at {path} (set HARNESS_SAMPLES); "
                    "they are never copied into this repository")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session; HARNESS_TEST_CACHE reuses generated data across runs."""
    env = os.environ.get("HARNESS_TEST_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_scannet(cache_dir):
    """The embedded ScanNet with few scenes and frames (same generator and reader as make table1)."""
    from omegaconf import OmegaConf

    from harness.data.scannet import ScanNet, ScanNetConfig

    cfg = OmegaConf.structured(ScanNetConfig)
    cfg.cache_dir = str(cache_dir)
    cfg.embedded.train_scenes = 3
    cfg.embedded.val_scenes = 1
    cfg.embedded.frames_per_scene = 4
    return ScanNet(cfg)
