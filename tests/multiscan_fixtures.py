"""Shared fixtures of the multi-scan method tests: a tiny embedded ScanNet whose frames overlap."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import torch
from omegaconf import OmegaConf


_MEMO: dict = {}


@pytest.fixture(scope="session")
def pair_scannet(tmp_path_factory):
    """One train scene (and one val scene) of the embedded ScanNet, 12 small frames on a loop:
    consecutive frames overlap by 25-60% (about 11 pairs >= 30%)."""
    from harness.data.scannet import ScanNet, ScanNetConfig

    if "scannet" in _MEMO:  # one instance per session, whichever module asks first
        return _MEMO["scannet"]
    cfg = OmegaConf.structured(ScanNetConfig)
    cfg.cache_dir = str(tmp_path_factory.mktemp("pair-scannet-cache"))
    cfg.embedded.seed = 7
    cfg.embedded.train_scenes = 1
    cfg.embedded.val_scenes = 1
    cfg.embedded.frames_per_scene = 12
    cfg.embedded.depth_size = [80, 60]
    cfg.embedded.color_size = [80, 60]
    cfg.embedded.mesh_spacing = 0.08
    _MEMO["scannet"] = ScanNet(cfg)
    return _MEMO["scannet"]


def tiny_context(workdir: Path, dataset: Any, seed: int = 0, trainer: Optional[Dict[str, Any]] = None):
    """A CPU run context with a narrow Res16UNet14A (fast enough for unit tests)."""
    from harness.config import BackboneConfig, TrainerConfig
    from harness.context import RunContext

    backbone = OmegaConf.merge(OmegaConf.structured(BackboneConfig),
                               {"name": "Res16UNet14A", "planes": [8, 8, 16, 16, 16, 16, 16, 16], "backend": "torch"})
    tr = OmegaConf.merge(OmegaConf.structured(TrainerConfig), trainer or {})
    return RunContext(workdir=Path(workdir), seed=seed, device=torch.device("cpu"), backbone=backbone, trainer=tr,
                      dataset=dataset, progress=False)


def method_config(name: str, **overrides: Any):
    """The method's YAML config with tiny sizes for tests."""
    from harness.config import plugin_config

    small = {"batch_size": 2, "voxel_size": 0.1, "num_matches": 256, "steps": 30}
    small.update(overrides)
    return plugin_config("method", name, small)
