"""The worked plugin example (examples/colorization_plugin): found through its entry point,
listed with the built-in methods, and it pre-trains and exports like them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from harness.registry import METHODS, Registry

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "colorization_plugin"


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    """What `pip install -e examples/colorization_plugin` leaves: the package on the path and a
    dist-info whose entry_points.txt registers the method."""
    dist = tmp_path / "harness_colorization-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-colorization\nVersion: 0.1.0\n")
    import tomllib

    eps = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]["harness.methods"]
    (dist / "entry_points.txt").write_text("[harness.methods]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("method", base_cls="harness.api:Method", entry_point_group="harness.methods")
    registry.register("scratch", METHODS.get("scratch"))
    return registry


def test_entry_point_registers_the_method(installed_example):
    names = installed_example.names()
    assert "colorization" in names and "scratch" in names
    cls = installed_example.get("colorization")
    assert cls.group == "Single-scan" and cls.consumes == ("scenes",)
    assert "entry point harness.methods:colorization" in installed_example.origin("colorization")


def test_plugin_pretrains_and_exports(installed_example, small_scannet, tmp_path):
    from omegaconf import OmegaConf

    from harness.backbones.checkpoint import load_backbone, read_checkpoint
    from harness.config import BackboneConfig, TrainerConfig
    from harness.context import RunContext

    cls = installed_example.get("colorization")
    cfg = OmegaConf.structured(cls.Config(steps=30, batch_size=2, max_points=3000, voxel_size=0.08))
    cfg.optimizer.lr = 0.05
    backbone = OmegaConf.structured(BackboneConfig(name="Res16UNet14A", planes=[16, 16, 32, 32, 32, 32, 24, 24],
                                                   backend="torch"))
    ctx = RunContext(tmp_path, 0, torch.device("cpu"), backbone, OmegaConf.structured(TrainerConfig(log_every=1)),
                     small_scannet, progress=False)
    path = cls(cfg).pretrain(ctx)
    state, meta = read_checkpoint(path)
    assert meta["method"] == "colorization" and meta["input_features"] == "ones"
    assert not any(k.startswith("final.") for k in state)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics-pretrain.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    fresh = ctx.build_backbone(3, 20)
    report = load_backbone(fresh, path, expect={"in_channels": 3})
    assert len(report.loaded) > 0 and all(k.startswith("final.") for k in report.missing)
