"""3D object detection, VoteNet-style on the sparse backbone; VoteNet's mAP@0.5 (and @0.25).

The backbone is built with ``out_channels = feature_dim`` (256: the recipe widens ``final`` from
96 to 256), so every voxel carries a 256-d feature. Per scene, ``num_seeds`` voxels are picked by
farthest-point sampling (in PyTorch) as seeds; a voting module (two linear-BN-ReLU layers and a
linear layer) moves each seed by a predicted offset towards its object's centre and adds a
feature residual (votes are L2-normalised, as in VoteNet). Proposals: ``num_proposals`` votes by
FPS, each grouping the votes within ``vote_radius`` (first ``vote_nsample`` in index order, as
pointnet2's ball query) through a shared MLP (3+C -> 128 -> 128 -> 128) and a max-pool, then two
linear-BN-ReLU layers and a linear layer giving objectness (2), centre offset (3), heading bin
scores and normalised residuals (2 x NH), size class scores and normalised residuals (4 x NS,
one size class per semantic class, residuals over the class's mean size from the training set)
and semantic scores (NC).

Losses as in VoteNet: vote loss (L1 to the nearest of up to ``max_votes`` gt votes, seeds on
objects only), objectness (cross-entropy weighted 0.2/0.8; positive nearer than
``near_threshold`` to a gt centre, negative farther than ``far_threshold``), centre (Chamfer:
proposal -> nearest gt over positives, gt -> nearest proposal), heading and size class
cross-entropy + Huber on normalised residuals, semantic cross-entropy, all on positives;
``loss = 10 (vote + 0.5 obj + centre + 0.1 heading_cls + heading_reg + 0.1 size_cls + size_reg
+ 0.1 sem)``. Headings (``use_heading``) are on for SUN RGB-D and off for ScanNet's axis-aligned
boxes (one heading bin, decoded heading 0). Inference: boxes with objectness > ``conf_threshold``
holding at least ``min_box_points`` of the scene's voxels, per-class 3D NMS at ``nms_iou`` (exact box IoU, :func:`harness.metrics.box3d_iou`), each kept box
then proposed for every class with score objectness x class probability (VoteNet's evaluation
setting). Boxes are ``(cx, cy, cz, dx, dy, dz, heading)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from harness.api import Task
from harness.config import OptimizerConfig, ScheduleConfig
from harness.data import augment as aug
from harness.metrics import box3d_iou, detection_ap
from harness.registry import TASKS
from harness.tasks.common import (FinetuneConfig, SceneData, collate, fit, load_pretrained, points_in_boxes,
                                   thing_classes)

log = logging.getLogger(__name__)

FAR = 1e6  # distance to a padding gt box


@dataclass
class DetectionConfig(FinetuneConfig):
    task: str = "detection"
    # ScanNet recipe: 180 epochs of 1201 scans at batch 32 (6756 steps), 2.5 cm voxels,
    # Adam lr 1e-3 x0.1 at epochs 80/120/160.
    steps: int = 6756
    batch_size: int = 32
    voxel_size: float = 0.025
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="multistep", gamma=0.1,
                                                                            milestones=[80 / 180, 120 / 180, 160 / 180]))
    # VoteNet's ScanNet augmentation: flips and a small rotation (+-5 degrees), no scaling.
    augment: aug.AugmentConfig = field(default_factory=lambda: aug.AugmentConfig(
        rotate_z=math.pi / 36, scale_min=1.0, scale_max=1.0, flip=True, color_jitter=0.0, color_noise=0.0))
    # Train ids of the detected classes; null = the dataset's instance_classes.
    classes: Optional[List[int]] = None
    # Oriented boxes (SUN RGB-D): heading bins + residuals; off = axis-aligned boxes (ScanNet).
    use_heading: bool = False
    num_heading_bins: int = 12
    # Width of the backbone's final layer (the seed features).
    feature_dim: int = 256
    num_seeds: int = 1024
    num_proposals: int = 256
    vote_radius: float = 0.3
    vote_nsample: int = 16
    # A seed inside several gt boxes keeps up to this many votes (the loss takes the nearest).
    max_votes: int = 3
    # Whether the proposal losses back-propagate into the vote positions (through the sampled
    # cluster centres and the grouped offsets), as VoteNet's gather/group ops do. Off, the votes
    # learn from the vote loss alone, which converges far faster in short (CPU-sized) runs.
    vote_position_gradient: bool = True
    near_threshold: float = 0.3
    far_threshold: float = 0.6
    objectness_weights: List[float] = field(default_factory=lambda: [0.2, 0.8])
    nms_iou: float = 0.25
    conf_threshold: float = 0.05
    per_class_proposal: bool = True
    # points per scene, drawn at random before voxelisation, in training and evaluation (VoteNet's
    # num_point: ScanNet 40000, SUN RGB-D 20000); 0 = every point
    sample_points: int = 0
    # predicted boxes with fewer of the scene's points (voxel representatives) inside are dropped
    # (VoteNet's evaluation without faster_eval: 5); 0 keeps them
    min_box_points: int = 5


# ----------------------------------------------------------------------------------------------
# Geometry in PyTorch


def furthest_point_sample(xyz: torch.Tensor, npoint: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, npoint) indices of farthest-point samples of ``xyz`` (B, N, 3), starting at index 0
    (as pointnet2's op); ``valid`` (B, N) excludes padding (index 0 must be valid). Once every
    valid point is taken, index 0 repeats."""
    B, N, _ = xyz.shape
    xyz = xyz.detach()
    dist = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)
    if valid is not None:
        dist[~valid] = -1.0
    out = torch.zeros(B, npoint, dtype=torch.long, device=xyz.device)
    far = torch.zeros(B, dtype=torch.long, device=xyz.device)
    rows = torch.arange(B, device=xyz.device)
    for k in range(npoint):
        out[:, k] = far
        d = ((xyz - xyz[rows, far][:, None, :]) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        far = dist.argmax(1)
    return out


def ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, nsample: int) -> torch.Tensor:
    """(B, P, nsample): for each centre, the first ``nsample`` points (in index order) of ``xyz``
    (B, N, 3) closer than ``radius``, padded with the first one (pointnet2's ball query); a
    centre with no point in range gets index 0."""
    N = xyz.shape[1]
    d2 = torch.cdist(centres.detach(), xyz.detach()) ** 2
    order = torch.arange(N, device=xyz.device)
    key = torch.where(d2 < radius * radius, order, order + N)
    k = min(nsample, N)
    key = torch.topk(key, k, dim=-1, largest=False, sorted=True).values
    found = key < N
    idx = torch.where(found, key, key.new_zeros(()))
    idx = torch.where(found, idx, idx[..., :1].expand_as(idx))
    if k < nsample:
        idx = torch.cat([idx, idx[..., :1].expand(*idx.shape[:-1], nsample - k)], -1)
    return idx


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, C) at ``idx`` (B, ...) -> (B, ..., C)."""
    B = x.shape[0]
    flat = idx.reshape(B, -1)
    out = torch.gather(x, 1, flat[..., None].expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


# ----------------------------------------------------------------------------------------------
# Box encoding


def encode_heading(angle: np.ndarray, num_bins: int) -> Tuple[np.ndarray, np.ndarray]:
    """VoteNet's angle2class: bin ``k`` is centred on ``k * 2pi / num_bins``; the residual is the
    angle minus the bin centre, in [-pi/num_bins, pi/num_bins)."""
    per = 2 * np.pi / num_bins
    a = np.mod(np.asarray(angle, dtype=np.float64), 2 * np.pi)
    shifted = np.mod(a + per / 2, 2 * np.pi)
    cls = np.minimum(np.floor(shifted / per).astype(np.int64), num_bins - 1)
    return cls, shifted - (cls * per + per / 2)


def decode_heading(cls: Any, residual: Any, num_bins: int) -> Any:
    """Angle of bin ``cls`` plus ``residual``, wrapped to [-pi, pi) (numpy or torch)."""
    per = 2 * math.pi / num_bins
    a = cls * per + residual
    return (a + math.pi) % (2 * math.pi) - math.pi


def encode_size(size: np.ndarray, cls: np.ndarray, mean_sizes: np.ndarray) -> np.ndarray:
    """Residual of full extents ``size`` (..., 3) over the mean size of size class ``cls``."""
    return np.asarray(size, dtype=np.float64) - np.asarray(mean_sizes, dtype=np.float64)[np.asarray(cls)]


def decode_size(cls: Any, residual: Any, mean_sizes: Any) -> Any:
    return mean_sizes[cls] + residual


def nms_3d(boxes: np.ndarray, scores: np.ndarray, threshold: float,
           labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Greedy 3D NMS: by descending score, keep a box and drop the later ones whose 3D IoU with
    it exceeds ``threshold`` (same label only, when ``labels`` is given). Returns kept indices."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    iou = box3d_iou(boxes, boxes)
    if labels is not None:
        labels = np.asarray(labels)
        iou = np.where(labels[:, None] == labels[None, :], iou, 0.0)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    dropped = np.zeros(n, dtype=bool)
    keep = []
    for i in order:
        if dropped[i]:
            continue
        keep.append(i)
        dropped |= iou[i] > threshold
    return np.asarray(keep, dtype=np.int64)


def vote_targets(points: np.ndarray, boxes: np.ndarray, max_votes: int, point_instance: Optional[np.ndarray] = None,
                 box_instance: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Per point: up to ``max_votes`` offsets to the centres of the boxes it lies in (unused slots
    repeat the first), flattened to (N, 3 * max_votes), and whether it votes at all (VoteNet's
    SUN RGB-D votes). With instance ids of the points and of the boxes, a point votes only for its
    own instance's box, in every slot (VoteNet's ScanNet votes: a chair's point never votes for
    the centre of the chair next to it, however the boxes overlap)."""
    n = len(points)
    votes = np.zeros((n, max_votes, 3), dtype=np.float32)
    if len(boxes) == 0:
        return votes.reshape(n, -1), np.zeros(n, dtype=bool)
    if point_instance is not None and box_instance is not None:
        inside = np.asarray(point_instance)[:, None] == np.asarray(box_instance)[None, :]
    else:
        inside = points_in_boxes(points, boxes)
    count = inside.sum(1)
    slots = np.argsort(~inside, axis=1, kind="stable")[:, :max_votes]
    if slots.shape[1] < max_votes:
        slots = np.concatenate([slots, np.repeat(slots[:, :1], max_votes - slots.shape[1], 1)], 1)
    used = np.arange(max_votes)[None, :] < count[:, None]
    slots = np.where(used, slots, slots[:, :1])
    votes[:] = (np.asarray(boxes)[slots, :3] - points[:, None, :]).astype(np.float32)
    return votes.reshape(n, -1), count > 0


# ----------------------------------------------------------------------------------------------
# The network


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class VotingModule(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = _mlp([dim, dim, dim])
        self.out = nn.Linear(dim, 3 + dim)

    def forward(self, xyz: torch.Tensor, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, S, C = feat.shape
        net = self.out(self.mlp(feat.reshape(B * S, C))).reshape(B, S, 3 + C)
        vote_xyz = xyz + net[..., :3]
        vote_feat = feat + net[..., 3:]
        return vote_xyz, vote_feat / vote_feat.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ProposalModule(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heading_bins: int, num_size_classes: int):
        super().__init__()
        self.group_mlp = _mlp([3 + dim, 128, 128, 128])
        self.mlp = _mlp([128, 128, 128])
        self.out = nn.Linear(128, 2 + 3 + 2 * num_heading_bins + 4 * num_size_classes + num_classes)

    def forward(self, grouped: torch.Tensor) -> torch.Tensor:
        B, P, K, C = grouped.shape
        x = self.group_mlp(grouped.reshape(B * P * K, C)).reshape(B, P, K, -1).max(2).values
        return self.out(self.mlp(x.reshape(B * P, -1))).reshape(B, P, -1)


class VoteNetModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, mean_sizes: np.ndarray, cfg: Any):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.nh = int(cfg.num_heading_bins) if cfg.use_heading else 1
        self.use_heading = bool(cfg.use_heading)
        self.cfg = cfg
        dim = int(cfg.feature_dim)
        self.vote = VotingModule(dim)
        self.proposal = ProposalModule(dim, num_classes, self.nh, num_classes)
        self.register_buffer("mean_sizes", torch.as_tensor(np.asarray(mean_sizes), dtype=torch.float32))

    # -- network --------------------------------------------------------------------------------
    def net(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        feat = self.backbone(batch["coords"], batch["feats"]).float()
        points = batch["points"].float()
        offsets = batch["offsets"]
        counts = (offsets[1:] - offsets[:-1]).tolist()
        B, n_max = len(counts), max(counts)
        local = torch.arange(n_max, device=feat.device)
        valid = local[None, :] < offsets.new_tensor(counts)[:, None]
        rows = torch.where(valid, offsets[:-1, None] + local[None, :], offsets[:-1, None])  # pad with each scene's first
        seeds = offsets[:-1, None] + furthest_point_sample(points[rows], cfg.num_seeds, valid)
        seed_xyz, seed_feat = points[seeds], feat[seeds]
        vote_xyz, vote_feat = self.vote(seed_xyz, seed_feat)
        vote_pos = vote_xyz if cfg.vote_position_gradient else vote_xyz.detach()
        centre_idx = furthest_point_sample(vote_pos, cfg.num_proposals)
        agg_xyz = gather(vote_pos, centre_idx)
        group = ball_query(vote_pos, agg_xyz, cfg.vote_radius, cfg.vote_nsample)
        grouped_xyz = (gather(vote_pos, group) - agg_xyz[:, :, None, :]) / cfg.vote_radius
        out = self.proposal(torch.cat([grouped_xyz, gather(vote_feat, group)], -1))
        nh, ns, nc = self.nh, self.num_classes, self.num_classes
        o = 5
        end = {"seeds": seeds, "seed_xyz": seed_xyz, "vote_xyz": vote_xyz, "agg_xyz": agg_xyz,
               "objectness": out[..., 0:2], "centre": agg_xyz + out[..., 2:5],
               "heading_scores": out[..., o:o + nh],
               "heading_residuals_normalized": out[..., o + nh:o + 2 * nh]}
        o += 2 * nh
        end["size_scores"] = out[..., o:o + ns]
        end["size_residuals_normalized"] = out[..., o + ns:o + 4 * ns].reshape(B, -1, ns, 3)
        end["sem_scores"] = out[..., o + 4 * ns:o + 4 * ns + nc]
        return end

    # -- training -------------------------------------------------------------------------------
    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        end = self.net(batch)
        losses = self.losses(end, batch)
        return losses

    def losses(self, end: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        eps = 1e-6
        # votes: L1 to the nearest gt vote, over seeds inside an object
        seeds = end["seeds"]
        B, S = seeds.shape
        gt_votes = batch["vote_target"][seeds].reshape(B, S, -1, 3) + end["seed_xyz"][:, :, None, :]
        vote_mask = batch["vote_mask"][seeds].float()
        vote_dist = (end["vote_xyz"][:, :, None, :] - gt_votes).abs().sum(-1).min(-1).values
        vote_loss = (vote_dist * vote_mask).sum() / (vote_mask.sum() + eps)

        gt_centre = batch["gt_boxes"][..., :3]
        gt_mask = batch["gt_mask"].float()
        # objectness from the distance of each proposal's vote to the nearest gt centre
        d2 = torch.cdist(end["agg_xyz"], gt_centre) ** 2
        d2 = torch.where(batch["gt_mask"][:, None, :], d2, d2.new_full((), FAR))
        dist1, assign = d2.min(-1)
        euclid = torch.sqrt(dist1 + eps)
        obj_label = (euclid < cfg.near_threshold).long()
        obj_mask = ((euclid < cfg.near_threshold) | (euclid > cfg.far_threshold)).float()
        w = torch.as_tensor(list(cfg.objectness_weights), dtype=torch.float32, device=d2.device)
        obj_ce = F.cross_entropy(end["objectness"].transpose(1, 2), obj_label, weight=w, reduction="none")
        obj_loss = (obj_ce * obj_mask).sum() / (obj_mask.sum() + eps)
        pos = obj_label.float()
        npos = pos.sum() + eps

        # centre: Chamfer between predicted centres and gt centres
        c2 = torch.cdist(end["centre"], gt_centre) ** 2
        c2 = torch.where(batch["gt_mask"][:, None, :], c2, c2.new_full((), FAR))
        centre1 = c2.min(-1).values
        centre2 = c2.min(1).values
        centre_loss = (centre1 * pos).sum() / npos + (centre2 * gt_mask).sum() / (gt_mask.sum() + eps)

        def assigned(x: torch.Tensor) -> torch.Tensor:  # (B, K, ...) gt values -> (B, P, ...) per proposal
            idx = assign.reshape(*assign.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
            return torch.gather(x, 1, idx)

        heading_cls = assigned(batch["heading_class"])
        heading_res = assigned(batch["heading_residual"])
        heading_cls_loss = (F.cross_entropy(end["heading_scores"].transpose(1, 2), heading_cls, reduction="none")
                            * pos).sum() / npos
        per = math.pi / self.nh
        res_pred = torch.gather(end["heading_residuals_normalized"], 2, heading_cls[..., None]).squeeze(-1)
        heading_reg_loss = (F.huber_loss(res_pred, heading_res / per, reduction="none", delta=1.0) * pos).sum() / npos

        size_cls = assigned(batch["gt_labels"])
        size_res = assigned(batch["size_residual"])
        size_cls_loss = (F.cross_entropy(end["size_scores"].transpose(1, 2), size_cls, reduction="none")
                         * pos).sum() / npos
        size_pred = torch.gather(end["size_residuals_normalized"], 2,
                                 size_cls[..., None, None].expand(-1, -1, 1, 3)).squeeze(2)
        size_label = size_res / self.mean_sizes[size_cls]
        size_reg_loss = (F.huber_loss(size_pred, size_label, reduction="none", delta=1.0).mean(-1) * pos).sum() / npos

        sem_loss = (F.cross_entropy(end["sem_scores"].transpose(1, 2), size_cls, reduction="none") * pos).sum() / npos
        box_loss = centre_loss + 0.1 * heading_cls_loss + heading_reg_loss + 0.1 * size_cls_loss + size_reg_loss
        loss = 10.0 * (vote_loss + 0.5 * obj_loss + box_loss + 0.1 * sem_loss)
        d = lambda t: t.detach()  # noqa: E731
        return {"loss": loss, "vote_loss": d(vote_loss), "objectness_loss": d(obj_loss), "centre_loss": d(centre_loss),
                "heading_cls_loss": d(heading_cls_loss), "heading_reg_loss": d(heading_reg_loss),
                "size_cls_loss": d(size_cls_loss), "size_reg_loss": d(size_reg_loss), "sem_loss": d(sem_loss),
                "positive_ratio": d(pos.mean())}

    # -- inference ------------------------------------------------------------------------------
    def decode(self, end: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Boxes (B, P, 7), objectness probability (B, P), class probabilities (B, P, NC)."""
        B, P = end["centre"].shape[:2]
        if self.use_heading:
            hc = end["heading_scores"].argmax(-1)
            hr = torch.gather(end["heading_residuals_normalized"], 2, hc[..., None]).squeeze(-1) * (math.pi / self.nh)
            heading = decode_heading(hc.float(), hr, self.nh)
        else:
            heading = end["centre"].new_zeros(B, P)
        sc = end["size_scores"].argmax(-1)
        sr = torch.gather(end["size_residuals_normalized"], 2, sc[..., None, None].expand(-1, -1, 1, 3)).squeeze(2)
        size = decode_size(sc, sr * self.mean_sizes[sc], self.mean_sizes).clamp_min(1e-3)
        boxes = torch.cat([end["centre"], size, heading[..., None]], -1)
        return {"boxes": boxes, "objectness": torch.softmax(end["objectness"], -1)[..., 1],
                "sem_prob": torch.softmax(end["sem_scores"], -1)}


def postprocess(boxes: np.ndarray, obj: np.ndarray, sem_prob: np.ndarray, nms_iou: float, conf_threshold: float,
                per_class_proposal: bool, points: Optional[np.ndarray] = None, min_box_points: int = 0
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene's proposals -> (boxes, class indices, scores): objectness above the threshold,
    at least ``min_box_points`` of the scene's ``points`` inside (VoteNet's empty-box removal),
    per-class NMS on the predicted class, then (VoteNet's evaluation) every kept box for every
    class with score objectness x class probability, or only its predicted class."""
    keep = np.nonzero(obj > conf_threshold)[0]
    if min_box_points > 0 and points is not None and len(keep):
        keep = keep[points_in_boxes(points, boxes[keep]).sum(0) >= min_box_points]
    cls = sem_prob.argmax(1)
    keep = keep[nms_3d(boxes[keep], obj[keep], nms_iou, labels=cls[keep])]
    if not per_class_proposal:
        return boxes[keep], cls[keep], obj[keep]
    nc = sem_prob.shape[1]
    out_boxes = np.repeat(boxes[keep], nc, axis=0)
    out_cls = np.tile(np.arange(nc), len(keep))
    out_scores = (obj[keep][:, None] * sem_prob[keep]).reshape(-1)
    return out_boxes, out_cls, out_scores


# ----------------------------------------------------------------------------------------------
# The task


@TASKS.register("detection")
class Detection(Task):
    Config = DetectionConfig
    metric = "map50"

    def classes(self, ds: Any) -> List[int]:
        return thing_classes(ds, self.cfg.classes, "detection.classes")

    @staticmethod
    def mean_sizes(data: SceneData, classes: Sequence[int], use_heading: bool = True) -> np.ndarray:
        """Mean full extents (NC, 3) of each class's boxes over the training scenes (size classes).

        Without ``use_heading``, an oriented box in the training set is an error (it would be
        re-fitted to an axis-aligned box silently)."""
        sums = np.zeros((len(classes), 3))
        counts = np.zeros(len(classes))
        index = {c: k for k, c in enumerate(classes)}
        for i in range(len(data)):
            s = data.scene(i)
            if "boxes" not in s or "box_labels" not in s:
                raise KeyError(f"{data.dataset_name}: scene {data.names[i]} of split '{data.split}' has no "
                               f"'boxes'/'box_labels' arrays, which detection needs")
            boxes = np.asarray(s["boxes"]).reshape(-1, 7)
            turned = np.nonzero(np.abs(np.sin(boxes[:, 6])) > 1e-6)[0]
            if not use_heading and len(turned):
                raise ValueError(f"detection.use_heading is false but {data.dataset_name} scene {data.names[i]} has "
                                 f"oriented boxes (heading {float(boxes[turned[0], 6]):.3f} rad); set use_heading: true "
                                 f"for this column")
            for box, label in zip(boxes, np.asarray(s["box_labels"]).reshape(-1)):
                k = index.get(int(label))
                if k is not None:
                    sums[k] += box[3:6]
                    counts[k] += 1
        if counts.sum() == 0:
            raise ValueError(f"{data.dataset_name}: no box of classes {list(classes)} in split '{data.split}'")
        overall = sums.sum(0) / counts.sum()
        missing = [c for c, n in zip(classes, counts) if n == 0]
        if missing:
            log.info("detection.mean_sizes classes_without_train_boxes=%s fallback=overall_mean", missing)
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], overall[None, :])
        return np.maximum(means, 1e-2).astype(np.float32)

    def run(self, ctx: Any) -> Dict[str, Any]:
        cfg, ds = self.cfg, ctx.dataset
        classes = self.classes(ds)
        mode = "oriented" if cfg.use_heading else "axis_aligned"
        train = SceneData(ds, "train", cfg.voxel_size, cfg.augment, cfg.input_features, cfg.max_train_scenes,
                          boxes=mode, sample_points=cfg.sample_points)
        train.instances = all(k in train.scene(0) for k in ("instance", "instance_label"))
        val = SceneData(ds, cfg.eval_split, cfg.voxel_size, None, cfg.input_features, cfg.max_eval_scenes,
                        sample_points=cfg.sample_points)
        mean_sizes = self.mean_sizes(train, classes, cfg.use_heading)
        model = VoteNetModel(load_pretrained(ctx, cfg.feature_dim, cfg), len(classes), mean_sizes, cfg)
        nh = model.nh

        def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
            samples = [train.sample(i, r) for (i, _), r in zip(items, rngs)]
            return detection_batch(samples, classes, mean_sizes, nh, cfg.max_votes)

        summary = fit(ctx, cfg, model, train, make_batch, ("vote.", "proposal."),
                      lambda m: {"map50": self.evaluate(m, val, classes, ctx.device)["map50"]})
        metrics = self.evaluate(model, val, classes, ctx.device)
        names = list(getattr(ds, "class_names", []))
        name = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
        return {
            "map50": metrics["map50"],
            "map25": metrics["map25"],
            "per_class_ap50": {name(c): v for c, v in metrics["per_class_ap50"].items()},
            "per_class_ap25": {name(c): v for c, v in metrics["per_class_ap25"].items()},
            "classes": classes,
            "use_heading": bool(cfg.use_heading),
            "mean_sizes": {name(c): [round(float(v), 4) for v in m] for c, m in zip(classes, mean_sizes)},
            "eval_split": cfg.eval_split,
            "eval_scenes": len(val),
            **summary,
        }

    def predict(self, model: VoteNetModel, sample: Dict[str, Any], device: torch.device
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes, class indices and scores of one (unaugmented) sample."""
        cfg = self.cfg
        batch = collate([sample], ("points",))
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.decode(model.net(batch))
        return postprocess(out["boxes"][0].double().cpu().numpy(), out["objectness"][0].double().cpu().numpy(),
                           out["sem_prob"][0].double().cpu().numpy(), cfg.nms_iou, cfg.conf_threshold,
                           cfg.per_class_proposal, sample["points"], cfg.min_box_points)

    def evaluate(self, model: VoteNetModel, data: SceneData, classes: Sequence[int],
                 device: torch.device) -> Dict[str, Any]:
        gts, preds = [], []
        cls_arr = np.asarray(classes)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i in range(len(data)):
                scene = data.scene(i)
                if "boxes" not in scene or "box_labels" not in scene:
                    raise KeyError(f"{data.dataset_name}: scene {data.names[i]} of split '{data.split}' has no boxes "
                                   f"to evaluate against")
                boxes, cls, scores = self.predict(model, data.sample(i), device)
                preds.append((boxes, cls_arr[cls], scores))
                gts.append((np.asarray(scene["boxes"]).reshape(-1, 7), np.asarray(scene["box_labels"]).reshape(-1)))
        model.train(was_training)
        at50 = detection_ap(gts, preds, classes, 0.5)
        at25 = detection_ap(gts, preds, classes, 0.25)
        log.info("detection.eval map50=%.4f map25=%.4f scenes=%d predictions=%d", at50["map"], at25["map"], len(data),
                 sum(len(p[0]) for p in preds))
        return {"map50": float(at50["map"]), "map25": float(at25["map"]),
                "per_class_ap50": at50["per_class"], "per_class_ap25": at25["per_class"]}


def detection_batch(samples: List[Dict[str, Any]], classes: Sequence[int], mean_sizes: np.ndarray, num_heading_bins: int,
                    max_votes: int) -> Dict[str, Any]:
    """Collated backbone input plus VoteNet's targets: per-voxel votes and padded gt boxes
    (boxes of other classes are dropped) with their heading and size encodings."""
    index = {c: k for k, c in enumerate(classes)}
    votes, masks = [], []
    kept = []
    for s in samples:
        lab = np.asarray(s["box_labels"])
        sel = np.asarray([int(v) in index for v in lab], dtype=bool)
        boxes = np.asarray(s["boxes"], dtype=np.float64)[sel]
        lab = np.asarray([index[int(v)] for v in lab[sel]], dtype=np.int64)
        kept.append((boxes, lab))
        owners = (s["instance"], np.asarray(s["box_instance"])[sel]) if "box_instance" in s and "instance" in s \
            else (None, None)
        v, m = vote_targets(s["points"], boxes, max_votes, *owners)
        votes.append(v)
        masks.append(m)
    batch = collate(samples, ("points",))
    batch["vote_target"] = torch.from_numpy(np.concatenate(votes))
    batch["vote_mask"] = torch.from_numpy(np.concatenate(masks))
    k = max(1, max(len(b) for b, _ in kept))
    B = len(samples)
    gt_boxes = np.zeros((B, k, 7), np.float32)
    gt_labels = np.zeros((B, k), np.int64)
    gt_mask = np.zeros((B, k), bool)
    heading_class = np.zeros((B, k), np.int64)
    heading_residual = np.zeros((B, k), np.float32)
    size_residual = np.zeros((B, k, 3), np.float32)
    for b, (boxes, lab) in enumerate(kept):
        n = len(boxes)
        gt_boxes[b, :n] = boxes
        gt_labels[b, :n] = lab
        gt_mask[b, :n] = True
        if n:
            hc, hr = encode_heading(boxes[:, 6], num_heading_bins)
            heading_class[b, :n], heading_residual[b, :n] = hc, hr
            size_residual[b, :n] = encode_size(boxes[:, 3:6], lab, mean_sizes)
    batch.update({k_: torch.from_numpy(v) for k_, v in (
        ("gt_boxes", gt_boxes), ("gt_labels", gt_labels), ("gt_mask", gt_mask), ("heading_class", heading_class),
        ("heading_residual", heading_residual), ("size_residual", size_residual))})
    return batch
