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
    "batch_size": 1, "voxel_size": 0.15, "eval_split": "train", "max_train_scenes": 1, "max_eval_scenes": 1,
    "augment": {"rotate_z": 0.0, "scale_min": 1.0, "scale_max": 1.0, "flip": False, "color_jitter": 0.0,
                "color_noise": 0.0},
}


def _context(dataset, tmp_path, log_every=5):
    backbone = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {
        "name": "Res16UNet14A", "planes": [16, 16, 32, 32, 32, 32, 32, 32], "backend": "torch"})
    trainer = OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"checkpoint_every": 0, "log_every": log_every})
    return RunContext(workdir=tmp_path, seed=0, device=torch.device("cpu"), backbone=backbone, trainer=trainer,
                      dataset=dataset, progress=False)


def _losses(tmp_path, key="loss"):
    rows = [json.loads(line) for line in (tmp_path / "metrics-finetune.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_instseg_learns_the_training_scene(small_scannet, tmp_path):
    torch.manual_seed(0)
    cfg = plugin_config("task", "instseg", {**QUICK, "steps": 60, "optimizer": {"lr": 0.2},
                                             "cluster_radius": 0.16, "min_cluster_points": 3, "min_region_size": 100})
    result = TASKS.get("instseg")(cfg).run(_context(small_scannet, tmp_path))
    # the total goes negative (the direction term is minus a cosine): check the terms
    semantic, offset = _losses(tmp_path, "semantic_loss"), _losses(tmp_path, "offset_loss")
    assert semantic[-1] < 0.5 * semantic[0], semantic
    assert offset[-1] < 0.5 * offset[0], offset
    assert _losses(tmp_path, "direction_loss")[-1] < -0.5
    assert result["ap50"] > 0 and result["proposals"] > 0, result
    assert result["min_region_size"] == 100 and result["eval_split"] == "train"


def test_detection_learns_the_training_scene(small_scannet, tmp_path):
    torch.manual_seed(0)
    # the first scene's bookshelf and two desks (its door, window and picture are a voxel thin here)
    # 300 steps: at 100-150 the boxes reached IoU 0.25 but AP@0.5 was 0 or not, depending on
    # the rounding order of the backbone's sums. At 300, over torch seeds 0-3 and two rounding
    # orders, AP@0.25 was always 1.0 and AP@0.5 0.25-1.0 (the bookshelf's box is the one that
    # hovers around IoU 0.5), so AP@0.5 is only asked to be above zero.
    cfg = plugin_config("task", "detection", {**QUICK, "steps": 300, "voxel_size": 0.1, "optimizer": {"lr": 0.003},
                                               "schedule": {"name": "constant"}, "classes": [9, 12],
                                               "num_seeds": 512, "num_proposals": 256, "feature_dim": 64,
                                               "vote_position_gradient": False})
    result = TASKS.get("detection")(cfg).run(_context(small_scannet, tmp_path))
    losses, votes = _losses(tmp_path), _losses(tmp_path, "vote_loss")
    assert losses[-1] < 0.5 * losses[0], losses
    assert votes[-1] < 0.5 * votes[0], votes
    assert result["map25"] >= 0.75 and result["map50"] > 0, result
    assert not result["use_heading"] and result["classes"] == [9, 12]
