"""What every downstream task shares: scenes -> voxelised batches, backbone loading, results.

One pipeline serves semantic segmentation, instance segmentation and detection (no forked
copies per task): ``SceneData`` loads a split once, and per item augments, crops and voxelises
a scene; ``collate`` batches samples for the backbone; ``load_pretrained`` builds the backbone and
loads the method's exported checkpoint through the one checkpoint loader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from harness.api import TaskConfig
from harness.config import OptimizerConfig, ScheduleConfig
from harness.data import augment as aug

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TaskConfig):
    """Recipe fields shared by every fine-tuning task (CSC's downstream pipeline)."""

    steps: int = 20000
    batch_size: int = 48
    voxel_size: float = 0.02
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.1, momentum=0.9, dampening=0.1))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: aug.AugmentConfig = field(default_factory=aug.AugmentConfig)
    # BatchNorm momentum downstream (bn0..bn4, bntr4..bntr7; blocks keep 0.1 as in the public code)
    bn_momentum: float = 0.02
    # Backbone input features: rgb (RGB/255 - 0.5) or ones (geometry only).
    input_features: str = "rgb"
    # Split evaluated for Table 1.
    eval_split: str = "val"
    # Refuse a checkpoint pre-trained at another voxel size (null = record it, do not refuse).
    expect_voxel_size: Optional[float] = None
    # Scenes to use per split (0 = all); for quick runs.
    max_train_scenes: int = 0
    max_eval_scenes: int = 0


class SceneData:
    """The scenes of one split, loaded once; ``sample(i, rng)`` voxelises (and augments) one."""

    def __init__(self, dataset: Any, split: str, voxel_size: float, augment: Optional[aug.AugmentConfig],
                 input_features: str = "rgb", limit: int = 0):
        self.dataset = dataset
        self.split = split
        self.names = list(dataset.scenes(split))
        if limit:
            self.names = self.names[:limit]
        if not self.names:
            raise ValueError(f"{type(dataset).__name__}: split '{split}' has no scenes")
        self.voxel_size = voxel_size
        self.augment = augment
        self.input_features = input_features
        self._cache: Dict[int, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def scene(self, i: int) -> Dict[str, Any]:
        if i not in self._cache:
            self._cache[i] = self.dataset.load(self.names[i])
        return self._cache[i]

    def sample(self, i: int, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
        """Voxelised scene ``i``: coords (M,3) int32 >= 0, feats (M,3), per-voxel labels, and
        ``point_index`` (M,) / ``inverse`` (N,) linking voxels and the scene's points (of the crop)."""
        from harness.backbones.voxelize import voxelize

        s = self.scene(i)
        points = np.asarray(s["points"], dtype=np.float32)
        colors = np.asarray(s["colors"])
        keep = np.ones(len(points), dtype=bool)
        T = np.eye(4)
        if self.augment is not None and rng is not None:
            keep &= aug.dropout_mask(rng, len(points), self.augment.point_dropout)
            keep &= aug.crop_mask(rng, np.where(keep[:, None], points, np.inf), self.augment.max_points) \
                if self.augment.max_points else keep
            T = aug.random_transform(rng, self.augment)
        sel = np.nonzero(keep)[0]
        pts = aug.apply(T, points[sel])
        col = aug.jitter_colors(rng, colors[sel], self.augment) if self.augment is not None and rng is not None \
            else colors[sel].astype(np.float32)
        semantic = s.get("semantic")
        vox = voxelize(pts, self.voxel_size, labels=None if semantic is None else semantic[sel], mode="vote",
                       ignore_index=-100, rng=rng)
        coords = vox.coords - vox.coords.min(0)
        out: Dict[str, Any] = {
            "coords": coords.astype(np.int32),
            "feats": aug.input_features(self.input_features, col[vox.index]),
            "points": pts[vox.index],  # voxel representatives, augmented frame
            "point_index": sel[vox.index],  # into the scene's points
            "inverse": vox.inverse,  # crop's points -> voxel
            "crop": sel,
            "transform": T,
            "scene": i,
        }
        if semantic is not None:
            out["semantic"] = vox.labels.astype(np.int64)
        if "instance" in s:
            out["instance"] = np.asarray(s["instance"])[sel][vox.index].astype(np.int64)
        return out


def collate(samples: Sequence[Dict[str, Any]], keys: Sequence[str] = ("semantic",)) -> Dict[str, Any]:
    """Concatenate samples into backbone input: coords (sum M, 4) int32 with the batch index first."""
    coords = [np.concatenate([np.full((len(s["coords"]), 1), b, np.int32), s["coords"]], 1)
              for b, s in enumerate(samples)]
    batch: Dict[str, Any] = {
        "coords": torch.from_numpy(np.concatenate(coords)),
        "feats": torch.from_numpy(np.concatenate([s["feats"] for s in samples])),
        "offsets": torch.tensor(np.cumsum([0] + [len(s["coords"]) for s in samples]), dtype=torch.long),
    }
    for k in keys:
        batch[k] = torch.from_numpy(np.concatenate([s[k] for s in samples]))
    return batch


def load_pretrained(ctx: Any, out_channels: int, cfg: Any) -> torch.nn.Module:
    """The backbone with ``out_channels`` outputs, loaded from ``ctx.checkpoint`` (if any).

    The architecture and input channels must match the checkpoint's meta; the voxel size is
    checked only when the recipe sets ``expect_voxel_size`` (the published pipelines fine-tune
    at other voxel sizes than they pre-train, e.g. 2.5 cm -> 2 cm).
    """
    backbone = ctx.build_backbone(in_channels=3, out_channels=out_channels, bn_momentum=cfg.bn_momentum)
    if ctx.checkpoint is not None:
        from harness.backbones.checkpoint import load_backbone

        expect: Dict[str, Any] = {"in_channels": 3, "backbone": ctx.backbone.name}
        if cfg.expect_voxel_size:
            expect["voxel_size"] = float(cfg.expect_voxel_size)
        report = load_backbone(backbone, ctx.checkpoint, expect=expect)
        ctx.extra["checkpoint_load"] = {"loaded": len(report.loaded), "skipped": len(report.skipped),
                                        "missing": len(report.missing)}
    return backbone
