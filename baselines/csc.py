"""Contrastive Scene Contexts (CSC): PointInfoNCE split over shape-context partitions.

Same frame pairs, matches and optimiser as PointContrast (``baselines.contrastive``), with
colour input features (RGB/255 - 0.5), 4096 matches sampled per scene, tau 0.4, lr x0.99 every
1000 iterations, 100k iterations. Around each sampled anchor (its registered position in view
A, in voxel units) space is split into 8 shape-context partitions, as in CSC's public code:

- radial: bin 0 for r1 <= d < r2, bin 1 for d >= r2 (r1 = 2, r2 = 20); points nearer than r1
  (the anchor itself included) are in no partition;
- xy-angle atan2(dy, dx) in [0, 2 pi): bin 0 for [0, pi), bin 1 for [pi, 2 pi);
- zy-angle atan2(dy, dz) taken modulo pi: bin 0 for [0, pi/2), bin 1 for [pi/2, pi);
- partition = 4 x radial + 2 x xy + zy,

with (dx, dy, dz) = other point - anchor. The angle bins are evaluated exactly from signs (no
floating-point angles): xy = 1 iff dy < 0 or (dy = 0 and dx < 0); zy = 1 iff dy != 0 and
dy * dz <= 0. The InfoNCE of a partition only uses the negatives inside that partition (its
positive is always kept; a row without negatives there contributes 0); each partition's loss is
the mean over the scene's anchors, the partition losses are summed (``partition_reduction:
mean`` divides by 8 instead, the scaling of CSC's public trainer) and scenes are averaged.
Negatives never cross scenes, so no gather across processes is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch
import torch.nn.functional as F

from baselines.contrastive import FramePairConfig, FramePairMethod, PairModel, sample_rows
from harness.config import ScheduleConfig
from harness.registry import METHODS

N_PARTITIONS = 8


def partition_bins(xyz: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """(m, m) int64 partition of point j around anchor i (-1: none), for points ``xyz`` (m, 3)."""
    rel = xyz.unsqueeze(0) - xyz.unsqueeze(1)  # rel[i, j] = xyz[j] - xyz[i]
    dx, dy, dz = rel.unbind(-1)
    d2 = dx * dx + dy * dy + dz * dz
    radial = torch.full_like(d2, -1, dtype=torch.long)
    radial[(d2 >= r1 * r1) & (d2 < r2 * r2)] = 0
    radial[d2 >= r2 * r2] = 1
    xy = ((dy < 0) | ((dy == 0) & (dx < 0))).long()
    zy = ((dy != 0) & (dy * dz <= 0)).long()
    return torch.where(radial >= 0, radial * 4 + xy * 2 + zy, torch.full_like(radial, -1))


def partition_info_nce(fa: torch.Tensor, fb: torch.Tensor, bins: torch.Tensor, tau: float,
                       partitions: int = N_PARTITIONS) -> torch.Tensor:
    """Per-partition InfoNCE losses (partitions,) of matched rows ``fa[i] <-> fb[i]`` of one scene.

    For anchor i and partition p: log(exp(l_ii) + sum over k in p of exp(l_ik)) - l_ii, with
    l = normalised fa . fb / tau; averaged over the anchors. All partitions come from one pass
    over the logits: the exponentials (shifted by each row's maximum) are summed per partition
    with a scatter, instead of one masked log-sum-exp per partition.
    """
    za = F.normalize(fa, dim=1)
    zb = F.normalize(fb, dim=1)
    logits = za @ zb.t() / tau
    shift = logits.detach().max(dim=1, keepdim=True).values
    e = torch.exp(logits - shift)
    eye = torch.eye(len(za), dtype=torch.bool, device=za.device)
    negatives = e.masked_fill(eye | (bins < 0), 0.0)
    sums = torch.zeros(len(za), partitions, dtype=e.dtype, device=e.device)
    sums = sums.scatter_add(1, bins.clamp(min=0), negatives)  # (m, partitions)
    pos = e.diagonal().unsqueeze(1)
    return torch.log1p(sums / pos).mean(0)


class CSCModel(PairModel):
    def __init__(self, backbone: torch.nn.Module, cfg: Any):
        super().__init__(backbone, cfg)
        self.r1, self.r2 = float(cfg.r1), float(cfg.r2)
        if cfg.partition_reduction not in ("sum", "mean"):
            raise ValueError(f"csc.partition_reduction must be 'sum' or 'mean', got {cfg.partition_reduction!r}")
        self.reduction = cfg.partition_reduction

    def loss(self, out: torch.Tensor, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        item = batch["match_item"]
        scene_losses, matches, pos = [], 0, []
        for b in torch.unique(item).tolist():
            rows = torch.nonzero(item == b).squeeze(1)
            rows = rows[sample_rows(rows.numel(), self.num_matches, rows.device)]
            fa, fb = out[batch["match_a"][rows]], out[batch["match_b"][rows]]
            bins = partition_bins(batch["anchor"][rows].float(), self.r1, self.r2)
            per = partition_info_nce(fa, fb, bins, self.tau)
            scene_losses.append(per.sum() if self.reduction == "sum" else per.mean())
            matches += rows.numel()
            with torch.no_grad():
                pos.append((F.normalize(fa, dim=1) * F.normalize(fb, dim=1)).sum(1).mean())
        return {"loss": torch.stack(scene_losses).mean(), "pos_sim": torch.stack(pos).mean(),
                "matches": torch.tensor(float(matches))}


@dataclass
class CSCConfig(FramePairConfig):
    method: str = "csc"
    input_features: str = "rgb"
    steps: int = 100000
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="step", gamma=0.99, step_size=1000))
    # Shape-context radii in voxel units (radial bins [r1, r2) and [r2, inf))
    r1: float = 2.0
    r2: float = 20.0
    # Combine the 8 partition losses: sum (the recipe) or mean (CSC's public trainer scaling)
    partition_reduction: str = "sum"


@METHODS.register("csc")
class CSC(FramePairMethod):
    Config = CSCConfig
    Model = CSCModel
