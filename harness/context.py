"""What a pre-training or fine-tuning job hands to a method or a task."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

import harness
from harness.config import to_plain
from harness.provenance import git_commit

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    workdir: Path  # this job's directory: checkpoints, metric logs, exports
    seed: int
    device: torch.device
    backbone: Any  # BackboneConfig
    trainer: Any  # TrainerConfig
    dataset: Any  # a harness.api.Dataset (prepared)
    # Fine-tuning: the pre-trained backbone checkpoint to start from.
    checkpoint: Optional[Path] = None
    progress: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)

    def build_backbone(self, in_channels: int, out_channels: int, bn_momentum: Optional[float] = None) -> torch.nn.Module:
        from harness.backbones import build_backbone

        b = self.backbone
        torch.manual_seed(self.seed)
        return build_backbone(b.name, in_channels=in_channels, out_channels=out_channels, backend=b.backend,
                              layers=list(b.layers) if b.layers else None, planes=list(b.planes) if b.planes else None,
                              bn_momentum=bn_momentum)

    def checkpoint_meta(self, method: str, config: Any, input_features: str, voxel_size: float,
                        module: torch.nn.Module) -> Dict[str, Any]:
        """The JSON meta every exported backbone carries."""
        return {
            "backbone": self.backbone.name,
            "layers": list(module.layers),
            "planes": list(module.planes),
            "in_channels": int(module.in_channels),
            "input_features": input_features,
            "voxel_size": float(voxel_size),
            "method": method,
            "seed": self.seed,
            "config": to_plain(config),
            "harness_version": harness.__version__,
            "git_commit": git_commit(),
        }

