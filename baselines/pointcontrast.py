"""PointContrast: PointInfoNCE between matched points of two overlapping frames.

Recipe (PointContrast's launch scripts): frame pairs with overlap >= 30%, voxel 2.5 cm,
constant-ones input features (geometry only), 4096 matched pairs sampled per batch, tau 0.4,
32-d output, SGD lr 0.1 / momentum 0.8 / wd 1e-4, lr x0.99 every 250 iterations, batch 32,
60k iterations. The loss (paper eq. 1): L2-normalised features of the sampled matches,
logits f_A f_B^T / tau, cross-entropy with each match's partner as the target; every other
sampled point of view B is a negative. With several processes the view-B features of the
whole global batch are the negatives (``gather_with_grad``; targets offset by ``rank_offset``),
each rank samples its share of the 4096 matches of the global batch, and the loss is the mean
over the matches of every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch
import torch.nn.functional as F

from baselines.contrastive import FramePairConfig, FramePairMethod, PairModel, pair_augment, sample_rows
from harness.data import augment as aug
from harness import distributed as dist
from harness.registry import METHODS


def point_info_nce(fa: torch.Tensor, fb: torch.Tensor, tau: float) -> Dict[str, torch.Tensor]:
    """PointInfoNCE of matched rows ``fa[i] <-> fb[i]`` (features are L2-normalised here).

    Several processes: the candidates are the view-B rows of every rank and the loss is the
    mean over the rows of every rank (``global_mean``); a rank without rows still takes part."""
    za = F.normalize(fa, dim=1)
    zb = F.normalize(fb, dim=1)
    zb_all = dist.gather_with_grad(zb)
    logits = za @ zb_all.t() / tau
    target = torch.arange(len(za), device=za.device) + dist.rank_offset(len(zb), za.device)
    if len(za) == 0:  # only with several processes (one process returns before the loss)
        zero = logits.sum() * 0.0 + zb_all.sum() * 0.0
        return {"loss": dist.global_mean(zero, 0), "acc": zero.detach(), "pos_sim": zero.detach()}
    loss = dist.global_mean(F.cross_entropy(logits, target), len(za))
    with torch.no_grad():
        acc = (logits.argmax(1) == target).float().mean()
        pos = (za * zb).sum(1).mean()
    return {"loss": loss, "acc": acc, "pos_sim": pos}


class PointContrastModel(PairModel):
    collective_loss = True

    def loss(self, out: torch.Tensor, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        # num_matches is per global batch (the recipe's 4096): each rank samples its share
        per_rank = -(-self.num_matches // dist.world_size())
        sel = sample_rows(batch["match_a"].numel(), per_rank, out.device)
        res = point_info_nce(out[batch["match_a"][sel]], out[batch["match_b"][sel]], self.tau)
        res["matches"] = torch.tensor(float(sel.numel()))
        return res


@dataclass
class PointContrastConfig(FramePairConfig):
    method: str = "pointcontrast"
    input_features: str = "ones"
    # each view turned about its own random axis (public PointContrast; CSC keeps gravity up)
    augment: aug.AugmentConfig = field(default_factory=lambda: pair_augment("free"))


@METHODS.register("pointcontrast")
class PointContrast(FramePairMethod):
    Config = PointContrastConfig
    Model = PointContrastModel
