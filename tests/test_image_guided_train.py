"""Both stages train on the embedded frames (the loss falls), the encoder freeze holds, the whole
method exports a backbone that fine-tunes in semantic segmentation, and the feature picture is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.config import BackboneConfig, TrainerConfig, plugin_config
from harness.context import RunContext

TINY_BACKBONE = {"name": "Res16UNet14A", "planes": [8, 8, 16, 16, 16, 16, 8, 8], "backend": "torch"}


def make_ctx(workdir: Path, dataset, checkpoint=None) -> RunContext:
    backbone = OmegaConf.merge(OmegaConf.structured(BackboneConfig), TINY_BACKBONE)
    trainer = OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"log_every": 1, "checkpoint_every": 0})
    return RunContext(workdir=workdir, seed=0, device=torch.device("cpu"), backbone=backbone, trainer=trainer,
                      dataset=dataset, checkpoint=checkpoint, progress=False)


@pytest.fixture(scope="module")
def frames_scannet(tmp_path_factory):
    """The embedded ScanNet with frames large enough for the pixel targets to differ between
    neighbouring points (the shared small fixture's 40x30 depth is too coarse for stage 2)."""
    from harness.data.scannet import ScanNet, ScanNetConfig

    from .data_helpers import config

    return ScanNet(config(ScanNetConfig, cache_dir=str(tmp_path_factory.mktemp("scannet-frames")),
                          **{"embedded.train_scenes": 1, "embedded.val_scenes": 1, "embedded.frames_per_scene": 4,
                             "embedded.mesh_spacing": 0.1, "embedded.depth_size": [80, 60],
                             "embedded.color_size": [160, 120]}))


def method_cfg(**over):
    return plugin_config("method", "image_guided", OmegaConf.create(over))


def losses(workdir: Path, name: str) -> list:
    rows = [json.loads(line) for line in (workdir / f"metrics-{name}.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


STAGE1 = {"steps": 30, "batch_size": 2, "frame_stride": 1, "pixels_per_image": 256, "freeze_encoder_steps": 0,
          "view": {"crop_size": [64, 64]}, "optimizer": {"lr": 0.1}}
STAGE2 = {"steps": 30, "batch_size": 2, "frame_stride": 1, "points_per_frame": 128, "image_size": [160, 120],
          "optimizer": {"lr": 0.1}}


def test_stage1_lowers_the_pixel_loss(small_scannet, tmp_path):
    from methods.image_guided.frames import list_frames
    from methods.image_guided.stage1 import run_stage1

    torch.set_num_threads(1)
    cfg = method_cfg(stage1=STAGE1)
    frames = list_frames(small_scannet, 0, 1)
    run_stage1(make_ctx(tmp_path, small_scannet), cfg.stage1, frames)
    curve = losses(tmp_path, "stage1")
    assert len(curve) == 30
    assert np.mean(curve[-8:]) < np.mean(curve[:8]) - 0.1, curve


def test_encoder_stays_frozen_for_the_first_steps(small_scannet, tmp_path):
    from methods.image_guided.frames import list_frames
    from methods.image_guided.stage1 import build_net, run_stage1

    cfg = method_cfg(stage1={**STAGE1, "steps": 2, "freeze_encoder_steps": 2, "view": {"crop_size": [64, 64]}})
    start = build_net(cfg.stage1, 0).state_dict()  # run_stage1 builds the same net from the same seed
    net, _ = run_stage1(make_ctx(tmp_path, small_scannet), cfg.stage1, list_frames(small_scannet, 1, 1))
    end = net.state_dict()
    for k, v in start.items():
        if k.startswith("encoder.") and v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(end[k], v, msg=f"{k} moved while frozen")
    moved = [k for k in start if k.startswith("decoder.") and k.endswith("conv.weight") and not torch.equal(end[k], start[k])]
    assert moved, "the decoder did not train"


def test_stage2_lowers_the_point_pixel_loss(frames_scannet, tmp_path):
    from methods.image_guided.frames import list_frames
    from methods.image_guided.resunet import ResUNet
    from methods.image_guided.stage2 import run_stage2

    torch.set_num_threads(1)
    cfg = method_cfg(stage2=STAGE2)
    torch.manual_seed(0)
    net2d = ResUNet("resnet18")  # a fixed (untrained) 2D net still gives spatially structured targets
    model, _ = run_stage2(make_ctx(tmp_path, frames_scannet), cfg, list_frames(frames_scannet, 0, 1), net2d)
    curve = losses(tmp_path, "stage2")
    assert len(curve) == 30
    assert np.mean(curve[-8:]) < np.mean(curve[:8]) - 0.1, curve
    assert all(not p.requires_grad for p in model.net2d.parameters())


def test_pretrain_exports_a_backbone_that_fine_tunes_and_draws_the_picture(small_scannet, tmp_path):
    from harness.pretrain import EXPORT_NAME
    from harness.registry import METHODS, TASKS
    from methods.image_guided.method import NET2D_NAME, STAGE2_NAME
    from methods.image_guided.visualize import visualize_features

    cfg = method_cfg(stage1={**STAGE1, "steps": 2, "view": {"crop_size": [64, 64]}},
                     stage2={**STAGE2, "steps": 2})
    pre = tmp_path / "pretrain" / "image_guided__s0"
    ctx = make_ctx(pre, small_scannet)
    method = METHODS.get("image_guided")(cfg)
    path = method.pretrain(ctx)
    assert path == pre / EXPORT_NAME and path.is_file()
    assert (pre / NET2D_NAME).is_file() and (pre / STAGE2_NAME).is_file()
    assert ctx.extra["pretrain"]["stage1"]["steps"] == 2 and ctx.extra["pretrain"]["stage2"]["steps"] == 2

    from safetensors.torch import load_file

    exported = load_file(str(path))
    assert not any(k.startswith("final.") for k in exported)  # the pre-training head is not exported
    assert "conv0p1s1.kernel" in exported
    torch.testing.assert_close(exported["conv0p1s1.kernel"], method.model.backbone.state_dict()["conv0p1s1.kernel"])

    task_cfg = plugin_config("task", "semseg", OmegaConf.create(
        {"steps": 2, "batch_size": 1, "voxel_size": 0.05, "max_train_scenes": 1, "max_eval_scenes": 1}))
    fctx = make_ctx(tmp_path / "finetune", small_scannet, checkpoint=path)
    result = TASKS.get("semseg")(task_cfg).run(fctx)
    assert 0.0 <= result["miou"] <= 1.0
    load = fctx.extra["checkpoint_load"]
    assert load["loaded"] == len(exported) and load["skipped"] == 0
    assert load["missing"] == 2  # final.kernel and final.bias: the new task head

    scene = small_scannet.scenes("val")[0]
    out = visualize_features(pre, scene, dataset_cfg={"cache_dir": str(small_scannet.cfg.cache_dir),
                                                               "embedded": dict(small_scannet.cfg.embedded)})
    assert out == tmp_path / "report" / f"features_image_guided__s0_{scene}_{out.stem.split('_')[-1]}.png"
    from PIL import Image

    assert Image.open(out).size[0] > 500
