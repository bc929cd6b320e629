"""Instance segmentation and detection end to end on the embedded ScanNet: the losses go down
and the training scene is recognised (AP above zero), at sizes that run in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.config import BackboneConfig, TrainerConfig, plugin_config
from harness.context import RunContext
from harness.registry import TASKS

# One training scene, evaluated on itself, no augmentation: a quick overfit.
QUICK = {
    "batch_size": 1, "voxel_size": 0.1, "eval_split": "train", "max_train_scenes": 1, "max_eval_scenes": 1,
    "augment": {"rotate_z": 0.0, "scale_min": 1.0, "scale_max": 1.0, "flip": False, "color_jitter": 0.0,
                "color_noise": 0.0},
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the CI machine is small and shared (more threads only contend)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _context(dataset, tmp_path, log_every=5):
    backbone = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {
        "name": "Res16UNet14A", "planes": [16, 16, 32, 32, 32, 32, 32, 32], "backend": "torch"})
    trainer = OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"checkpoint_every": 0, "log_every": log_every})
    return RunContext(workdir=tmp_path, seed=0, device=torch.device("cpu"), backbone=backbone, trainer=trainer,
                      dataset=dataset, progress=False)


def _losses(tmp_path):
    rows = [json.loads(line) for line in (tmp_path / "metrics-finetune.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_instseg_learns_the_training_scene(small_scannet, tmp_path):
    torch.manual_seed(0)
    cfg = plugin_config("task", "instseg", {**QUICK, "steps": 60, "optimizer": {"lr": 0.1},
                                             "cluster_radius": 0.2, "min_cluster_points": 5, "min_region_size": 100})
    result = TASKS.get("instseg")(cfg).run(_context(small_scannet, tmp_path, log_every=10))
    losses = _losses(tmp_path)
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["ap50"] > 0 and result["proposals"] > 0, result
    assert result["min_region_size"] == 100 and result["eval_split"] == "train"


def test_detection_learns_the_training_scene(small_scannet, tmp_path):
    torch.manual_seed(0)
    cfg = plugin_config("task", "detection", {**QUICK, "steps": 60, "optimizer": {"lr": 0.003},
                                               "schedule": {"name": "constant"}, "num_seeds": 256,
                                               "num_proposals": 64, "feature_dim": 64})
    result = TASKS.get("detection")(cfg).run(_context(small_scannet, tmp_path, log_every=10))
    losses = _losses(tmp_path)
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["map25"] > 0 and result["map50"] > 0, result
    assert not result["use_heading"]
