"""PointContrast: PointInfoNCE between matched points of two overlapping frames.

Recipe (PointContrast's launch scripts): frame pairs with overlap >= 30%, voxel 2.5 cm,
constant-ones input features (geometry only), 4096 matched pairs sampled per batch, tau 0.4,
32-d output, SGD lr 0.1 / momentum 0.8 / wd 1e-4, lr x0.99 every 250 iterations, batch 32,
60k iterations. The loss (paper eq. 1): L2-normalised features of the sampled matches,
logits f_A f_B^T / tau, cross-entropy with each match's partner as the target; every other
sampled point of view B is a negative. With several processes the view-B features of the
whole global batch are the negatives (``gather_with_grad``; targets offset by ``rank_offset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn.functional as F

from baselines.contrastive import FramePairConfig, FramePairMethod, PairModel, sample_rows
from harness import distributed as dist
from harness.registry import METHODS


def point_info_nce(fa: torch.Tensor, fb: torch.Tensor, tau: float) -> Dict[str, torch.Tensor]:
    """PointInfoNCE of matched rows ``fa[i] <-> fb[i]`` (features are L2-normalised here)."""
    za = F.normalize(fa, dim=1)
    zb = F.normalize(fb, dim=1)
    zb_all = dist.gather_with_grad(zb)
    logits = za @ zb_all.t() / tau
    target = torch.arange(len(za), device=za.device) + dist.rank_offset(len(zb), za.device)
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        acc = (logits.argmax(1) == target).float().mean()
        pos = (za * zb).sum(1).mean()
    return {"loss": loss, "acc": acc, "pos_sim": pos}


class PointContrastModel(PairModel):
    def loss(self, out: torch.Tensor, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        sel = sample_rows(batch["match_a"].numel(), self.num_matches, out.device)
        res = point_info_nce(out[batch["match_a"][sel]], out[batch["match_b"][sel]], self.tau)
        res["matches"] = torch.tensor(float(sel.numel()))
        return res


@dataclass
class PointContrastConfig(FramePairConfig):
    method: str = "pointcontrast"
    input_features: str = "ones"


@METHODS.register("pointcontrast")
class PointContrast(FramePairMethod):
    Config = PointContrastConfig
    Model = PointContrastModel
