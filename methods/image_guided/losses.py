"""InfoNCE losses of both stages (paper eq. 1; stage 1 in SimCLR's symmetric form, NT-Xent).

For anchors z_i and candidates k_j (all L2-normalised), with k_i the positive of z_i:

    L = mean_i  -log( exp(z_i . k_i / tau) / sum_j exp(z_i . k_j / tau) )

i.e. cross-entropy over the logits z_i . k_j / tau with the matched index as the target; every
other candidate is a negative. The paper writes a sum over anchors; the mean only rescales it
(and keeps the learning rate independent of how many pairs a batch has).

Across processes the candidates are the *global* batch: ``harness.distributed.gather_with_grad``
concatenates every rank's candidates (a no-op with one process), the targets are offset by
``rank_offset`` and the mean is over the anchors of all ranks (``global_mean``). Large batches
(stage 1 at the published size has 64 x 4092 anchors) are computed in row chunks whose logits
are recomputed in the backward pass, so memory stays O(chunk x N) instead of O(N^2).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness import distributed as dist


def _chunk_loss(q: torch.Tensor, k: torch.Tensor, target: torch.Tensor, inv_tau: float,
                exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    logits = ((q @ k.t()) * inv_tau).float()
    if exclude is not None:  # an anchor that is itself among the candidates is not its own negative
        logits = logits.index_put((torch.arange(len(q), device=q.device), exclude),
                                  torch.tensor(float("-inf"), device=q.device))
    return F.cross_entropy(logits, target, reduction="sum")


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, tau: float, target: Optional[torch.Tensor] = None,
             chunk: int = 0, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean InfoNCE of ``anchors`` (M, D) against ``candidates`` (N, D); the positive of anchor i is
    ``candidates[target[i]]`` (default: ``candidates[i]``); ``exclude[i]`` (optional) is a
    candidate left out of anchor i's logits (the anchor itself). Inputs are used as given
    (normalise them first). ``chunk`` > 0 computes the logits ``chunk`` rows at a time with
    recomputation."""
    if anchors.shape[0] == 0:
        return anchors.sum() * 0.0 + candidates.sum() * 0.0
    if target is None:
        target = torch.arange(anchors.shape[0], device=anchors.device)
    inv_tau = 1.0 / float(tau)
    m = anchors.shape[0]
    if chunk <= 0 or m <= chunk:
        return _chunk_loss(anchors, candidates, target, inv_tau, exclude) / m
    total = anchors.new_zeros((), dtype=torch.float32)
    for s in range(0, m, chunk):
        part = checkpoint(_chunk_loss, anchors[s:s + chunk], candidates, target[s:s + chunk], inv_tau,
                          None if exclude is None else exclude[s:s + chunk], use_reentrant=False)
        total = total + part
    return total / m


def global_info_nce(anchors: torch.Tensor, positives: torch.Tensor, tau: float, chunk: int = 0) -> torch.Tensor:
    """InfoNCE of local anchors against the positives of *all* ranks (row i of ``positives`` is
    anchor i's positive; the other rows of the gathered batch are its negatives)."""
    candidates = dist.gather_with_grad(positives)
    offset = dist.rank_offset(positives.shape[0], positives.device)
    target = torch.arange(anchors.shape[0], device=anchors.device) + offset
    # the mean over the anchors of all ranks (ranks hold different numbers of matched pixels)
    return dist.global_mean(info_nce(anchors, candidates, tau, target, chunk), anchors.shape[0])


def pixel_info_nce(feat_a: torch.Tensor, feat_b: torch.Tensor, tau: float, chunk: int = 0) -> torch.Tensor:
    """Stage 1, SimCLR's loss (NT-Xent) over matched pixels: rows i of ``feat_a`` and ``feat_b``
    (M, D) are one pixel seen in the two views. Every one of the 2M pixels is an anchor; its
    positive is its match in the other view and every other pixel of the global batch, of either
    view and any image, is a negative (the paper: "all others, including those from other images
    in a batch"). The mean is over all 2M anchors, so the loss is symmetric in the views."""
    local = torch.cat([feat_a, feat_b])
    candidates = dist.gather_with_grad(local)
    m = feat_a.shape[0]
    offset = dist.rank_offset(local.shape[0], local.device)
    own = torch.arange(2 * m, device=local.device)
    target = offset + torch.cat([own[m:], own[:m]])  # pixel i of A <-> pixel i of B
    return dist.global_mean(info_nce(local, candidates, tau, target, chunk, exclude=offset + own), 2 * m)


def point_pixel_info_nce(point_feat: torch.Tensor, pixel_feat: torch.Tensor, tau: float,
                         chunk: int = 0) -> torch.Tensor:
    """Stage 2: each point's 16-d feature (anchor) against the frozen 2D feature of its own pixel
    (positive) and of the other sampled points' pixels (negatives)."""
    return global_info_nce(point_feat, pixel_feat.detach(), tau, chunk)
