"""The base of methods trained by the shared loop, and the export every method uses.

A trained method supplies ``build_model(ctx)`` (a module holding ``.backbone`` whose
``forward(batch)`` returns a loss dict) and ``batch_stream(ctx)``; ``pretrain`` runs the one
``Trainer`` and exports the backbone alone in the canonical checkpoint format.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from harness.api import Method, MethodConfig
from harness.config import OptimizerConfig, ScheduleConfig
from harness.train import BatchStream, Trainer

log = logging.getLogger(__name__)

EXPORT_NAME = "backbone.safetensors"


@dataclass
class PretrainConfig(MethodConfig):
    steps: int = 1000
    batch_size: int = 8
    voxel_size: float = 0.025
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="step", gamma=0.99, step_size=1000))
    # BatchNorm momentum in pre-training (bn0..bn4, bntr4..bntr7)
    bn_momentum: float = 0.05
    # Backbone input features: rgb (RGB/255 - 0.5) or ones (geometry only)
    input_features: str = "rgb"
    # Width of the backbone's final layer during pre-training (dropped at export)
    out_channels: int = 32
    # Pre-training scenes to use (0 = all of the train split); for quick runs
    max_scenes: int = 0


def export_backbone(path: Path, backbone: nn.Module, ctx: Any, method: str, cfg: Any) -> Path:
    """Write ``backbone`` (without ``final``) and its meta in the canonical format; with several
    processes rank 0 writes and the others wait for the file (every rank calls this)."""
    from harness import distributed as dist
    from harness.backbones.checkpoint import save_backbone

    meta = ctx.checkpoint_meta(method, cfg, cfg.input_features, cfg.voxel_size, backbone)
    dist.main_writes(lambda: save_backbone(path, backbone, meta))
    return Path(path)


class TrainedMethod(Method):
    """A pre-training method run by the shared ``Trainer``."""

    Config = PretrainConfig

    @abc.abstractmethod
    def build_model(self, ctx: Any) -> nn.Module:
        """The training module: holds ``.backbone``; ``forward(batch)`` returns {'loss': ..., ...}."""

    @abc.abstractmethod
    def batch_stream(self, ctx: Any) -> BatchStream:
        """The pre-training batches (deterministic from ctx.seed)."""

    def head_prefixes(self) -> tuple:
        return ()

    def pretrain(self, ctx: Any) -> Path:
        cfg = self.cfg
        self.model = self.build_model(ctx)
        trainer = Trainer(self.model, self.batch_stream(ctx), cfg.steps, cfg.optimizer, cfg.schedule, ctx.workdir,
                          ctx.device, ctx.trainer, name="pretrain", head_prefixes=self.head_prefixes(),
                          progress=ctx.progress)
        result = trainer.fit()
        ctx.extra["pretrain"] = {"steps": result.steps, "last": result.last, "seconds": round(result.seconds, 2),
                                 "resumed_from": result.resumed_from}
        return self.export(ctx.workdir / EXPORT_NAME, ctx)

    def export(self, path: Path, ctx: Any) -> Path:
        return export_backbone(path, self.model.backbone, ctx, self.cfg.method, self.cfg)
