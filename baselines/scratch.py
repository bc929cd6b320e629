"""Scratch: no pre-training. Its export is a freshly initialised backbone, seeded.

Fine-tuning from this checkpoint is training from scratch, through the same loader and the
same code path as every pre-trained method (so the comparison differs only in the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.api import Method, MethodConfig
from harness.pretrain import EXPORT_NAME, export_backbone
from harness.registry import METHODS


@dataclass
class ScratchConfig(MethodConfig):
    method: str = "scratch"
    # Recorded in the checkpoint meta; Scratch itself sees no data.
    input_features: str = "rgb"
    voxel_size: float = 0.0


@METHODS.register("scratch")
class Scratch(Method):
    group = "Scratch"
    consumes = ()
    Config = ScratchConfig

    def pretrain(self, ctx: Any) -> Path:
        # ctx.build_backbone seeds torch with ctx.seed: the initialisation is reproducible.
        self.backbone = ctx.build_backbone(in_channels=3, out_channels=32)
        return self.export(ctx.workdir / EXPORT_NAME, ctx)

    def export(self, path: Path, ctx: Any) -> Path:
        return export_backbone(path, self.backbone, ctx, "scratch", self.cfg)
