"""Colourisation pre-training, a complete method plugin in one file.

The backbone sees geometry only (constant input features) and learns to predict each voxel's
colour (RGB/255 - 0.5) with a linear head; mean squared error. A classic pretext task, small
enough to read in a minute: it shows everything a method supplies (config schema, group, data
it consumes, model with a loss, batches); the harness supplies the rest (training loop,
checkpoints, export, sweeps, Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from harness.backbones.voxelize import voxelize
from harness.data import augment as aug
from harness.pretrain import PretrainConfig, TrainedMethod
from harness.tasks.common import collate
from harness.train import BatchStream


@dataclass
class ColorizationConfig(PretrainConfig):
    method: str = "colorization"
    steps: int = 1000
    batch_size: int = 4
    voxel_size: float = 0.05
    input_features: str = "ones"  # geometry only: colour is the target
    max_points: int = 20000  # crop of each scene


class ColorModel(nn.Module):
    def __init__(self, backbone: nn.Module, width: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, 3)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        pred = self.head(self.backbone(batch["coords"], batch["feats"]))
        return {"loss": nn.functional.mse_loss(pred, batch["target"])}


class Colorization(TrainedMethod):
    group = "Single-scan"
    consumes = ("scenes",)
    Config = ColorizationConfig

    def build_model(self, ctx: Any) -> nn.Module:
        backbone = ctx.build_backbone(3, self.cfg.out_channels, self.cfg.bn_momentum)
        return ColorModel(backbone, self.cfg.out_channels)

    def batch_stream(self, ctx: Any) -> BatchStream:
        cfg, ds = self.cfg, ctx.dataset
        names = ds.scenes("train")[: cfg.max_scenes or None]
        scenes = {}

        def sample(i: int, rng: np.random.Generator) -> Dict[str, Any]:
            if i not in scenes:
                scenes[i] = ds.load(names[i])
            s = scenes[i]
            keep = aug.crop_mask(rng, s["points"], cfg.max_points)
            pts = aug.apply(aug.random_transform(rng, aug.AugmentConfig()), s["points"][keep])
            v = voxelize(pts, cfg.voxel_size, rng=rng)
            colors = s["colors"][keep][v.index]
            return {"coords": v.coords - v.coords.min(0),
                    "feats": aug.input_features(cfg.input_features, colors),
                    "target": aug.color_features(colors)}

        def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
            return collate([sample(i, r) for (i, _), r in zip(items, rngs)], keys=("target",))

        return BatchStream(len(names), cfg.batch_size, ctx.seed, make_batch)
