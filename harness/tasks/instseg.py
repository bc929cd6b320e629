"""Instance segmentation, PointGroup-style on the project backbone; ScanNet's AP@0.5.

The backbone's ``final`` is dropped; on its (N, planes[7]) features sit a semantic head (one
linear layer) and an offset head (linear, BatchNorm, ReLU, linear -> 3) predicting each voxel's
offset to its instance centre (the mean of the instance's points). Losses as in PointGroup:
semantic cross-entropy + offset L1 (summed over xyz, averaged over instance voxels) + offset
direction (minus the cosine to the true offset). Proposals: the voxels of each thing class,
shifted by their predicted offsets, linked when closer than ``cluster_radius`` (a KD-tree ball
query) and split into connected components; components with at least ``min_cluster_points``
voxels are proposals, scored by the mean predicted probability of their class. Masks are carried
to the original points through the voxel map and scored by :func:`harness.metrics.instance_ap`
(ScanNet's rules, ``min_region_size`` from config).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from harness.api import Task
from harness.config import OptimizerConfig
from harness.metrics import instance_ap
from harness.registry import TASKS
from harness.tasks.common import FinetuneConfig, SceneData, collate, fit, load_pretrained, thing_classes

log = logging.getLogger(__name__)


@dataclass
class InstSegConfig(FinetuneConfig):
    task: str = "instseg"
    # ScanNet recipe: SGD lr 0.1, momentum 0.9, dampening 0.1, wd 1e-4, poly 0.9, batch 48, 2 cm, 20k it
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.1, momentum=0.9, dampening=0.1,
                                                                               weight_decay=1e-4))
    # Train ids of the thing classes (instances are predicted and scored for these); the others
    # (e.g. wall, floor) are stuff. null = the dataset's instance_classes.
    instance_classes: Optional[List[int]] = None
    # Ball-query radius (metres) linking shifted voxels of the same predicted class.
    cluster_radius: float = 0.03
    # Fewest voxels in a proposal.
    min_cluster_points: int = 50
    # ScanNet's minimum region size (points) for predictions and counted gt instances.
    min_region_size: int = 100
    # Loss weights of the offset L1 and direction terms (semantic CE has weight 1).
    offset_weight: float = 1.0
    direction_weight: float = 1.0


class InstSegModel(nn.Module):
    """Backbone features -> semantic logits and per-voxel offsets to the instance centre."""

    def __init__(self, backbone: nn.Module, num_classes: int, thing_classes: Sequence[int], ignore_index: int,
                 offset_weight: float = 1.0, direction_weight: float = 1.0, bn_momentum: float = 0.1):
        super().__init__()
        backbone.final = nn.Identity()  # the heads below replace the 1x1 classifier
        width = int(backbone.planes[7])
        self.backbone = backbone
        self.semantic = nn.Linear(width, num_classes)
        self.offset = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width, momentum=bn_momentum),
                                    nn.ReLU(inplace=True), nn.Linear(width, 3))
        thing = torch.zeros(num_classes, dtype=torch.bool)
        thing[list(thing_classes)] = True
        self.register_buffer("thing", thing, persistent=False)
        self.ignore_index = ignore_index
        self.offset_weight = offset_weight
        self.direction_weight = direction_weight

    def predict(self, coords: torch.Tensor, feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(coords, feats)
        return self.semantic(f), self.offset(f)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        logits, offsets = self.predict(batch["coords"], batch["feats"])
        logits, offsets = logits.float(), offsets.float()
        sem_loss = nn.functional.cross_entropy(logits, batch["semantic"], ignore_index=self.ignore_index)
        # a voxel's class is its points' majority vote, its instance its representative point's:
        # where the two disagree (voxels on an object's border) it has no offset target
        mask = instance_mask(batch["instance_class"], self.thing) & (batch["instance_class"] == batch["semantic"])
        offset_loss, dir_loss = offset_losses(offsets, batch["instance_centre"] - batch["points"], mask)
        loss = sem_loss + self.offset_weight * offset_loss + self.direction_weight * dir_loss
        return {"loss": loss, "semantic_loss": sem_loss.detach(), "offset_loss": offset_loss.detach(),
                "direction_loss": dir_loss.detach()}


def instance_mask(instance_class: torch.Tensor, thing: torch.Tensor) -> torch.Tensor:
    """Voxels of an instance of a thing class."""
    valid = instance_class >= 0
    out = torch.zeros_like(valid)
    out[valid] = thing[instance_class[valid]]
    return out


def offset_losses(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """PointGroup's offset losses: mean over ``mask`` of the L1 distance (summed over xyz) and of
    minus the cosine between predicted and true offsets."""
    m = mask.float()
    denom = m.sum() + 1e-6
    l1 = ((pred - target).abs().sum(1) * m).sum() / denom
    gt_dir = target / (target.norm(dim=1, keepdim=True) + 1e-8)
    pr_dir = pred / (pred.norm(dim=1, keepdim=True) + 1e-8)
    cos = -(gt_dir * pr_dir).sum(1)
    return l1, (cos * m).sum() / denom


# Above this many point pairs closer than the radius within one class (shifted points collapse
# onto instance centres: a floor of 20k voxels made 2e8 pairs, 57 s and 9.8 GB), the grouping
# links each point only to its cell mates and its GROUP_NEIGHBOURS nearest (CSC's ball query is
# capped likewise, at 1000 neighbours).
GROUP_MAX_PAIRS = 5_000_000
GROUP_NEIGHBOURS = 32


def _close_pairs(pts: np.ndarray, radius: float, tree: Any) -> np.ndarray:
    """(M, 2) index pairs closer than ``radius``: all of them, or where they are too many, those
    within a cell of side radius / sqrt(3) (all closer than the radius) plus each point's nearest."""
    n = len(pts)
    if (int(tree.count_neighbors(tree, radius)) - n) // 2 <= GROUP_MAX_PAIRS:  # ordered pairs, self included
        return tree.query_pairs(radius, output_type="ndarray")
    log.warning("instseg.group_capped points=%d radius=%g: too many close pairs; each point linked to its cell "
                "and its %d nearest", n, radius, GROUP_NEIGHBOURS)
    cells = np.unique(np.floor(pts / (radius / np.sqrt(3.0) * (1 - 1e-9))).astype(np.int64), axis=0,
                      return_inverse=True)[1].reshape(-1)
    first = np.full(cells.max() + 1, -1, dtype=np.int64)
    first[cells[::-1]] = np.arange(n)[::-1]  # the lowest index of each cell
    same = np.stack([np.arange(n), first[cells]], 1)
    k = min(GROUP_NEIGHBOURS + 1, n)
    dist, nb = tree.query(pts, k=k, distance_upper_bound=radius)
    dist, nb = dist.reshape(n, k), nb.reshape(n, k)
    ok = np.isfinite(dist)
    near = np.stack([np.repeat(np.arange(n), k)[ok.ravel()], nb.ravel()[ok.ravel()]], 1)
    return np.concatenate([same, near])


def group_proposals(shifted: np.ndarray, labels: np.ndarray, scores: np.ndarray, classes: Sequence[int],
                    radius: float, min_points: int) -> List[Tuple[np.ndarray, int, float]]:
    """Proposals ``(member indices, class, score)``: per class in ``classes``, the connected
    components of its points under "closer than ``radius``" (in ``shifted``), with at least
    ``min_points`` members; the score is the mean of ``scores`` (the class logit) over them."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    shifted = np.asarray(shifted, dtype=np.float64)
    labels = np.asarray(labels)
    out: List[Tuple[np.ndarray, int, float]] = []
    for c in classes:
        idx = np.nonzero(labels == c)[0]
        if len(idx) < max(min_points, 1):
            continue
        pts = shifted[idx]
        pairs = _close_pairs(pts, radius, cKDTree(pts))
        n = len(idx)
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        count, comp = connected_components(graph, directed=False)
        sizes = np.bincount(comp, minlength=count)
        order = np.argsort(comp, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for k in np.nonzero(sizes >= min_points)[0]:
            members = idx[order[starts[k]:starts[k + 1]]]
            out.append((members, int(c), float(np.mean(scores[members]))))
    return out


def gt_instance_ids(instance: np.ndarray, instance_label: np.ndarray) -> np.ndarray:
    """ScanNet's gt encoding over points: ``(label + 1) * 1000 + instance id`` (0 = none).

    Labels are shifted by one so that train id 0 stays a class (the metric treats label 0 as void).
    """
    inst = np.asarray(instance, dtype=np.int64)
    labels = np.asarray(instance_label, dtype=np.int64)
    if len(inst) and int(inst.max()) >= 1000:
        raise ValueError(f"instance id {int(inst.max())}: ScanNet's encoding (label + 1) * 1000 + id needs ids "
                         "below 1000 per scene")
    lab = np.full(max(int(inst.max()) + 1 if len(inst) else 0, len(labels)), -1, dtype=np.int64)
    lab[:len(labels)] = labels
    point_label = lab[inst]
    ok = (inst > 0) & (point_label >= 0)
    return np.where(ok, (point_label + 1) * 1000 + inst, 0)


@TASKS.register("instseg")
class InstanceSegmentation(Task):
    Config = InstSegConfig
    metric = "ap50"

    def thing_classes(self, ds: Any) -> List[int]:
        return thing_classes(ds, self.cfg.instance_classes, "instseg.instance_classes")

    def run(self, ctx: Any) -> Dict[str, Any]:
        cfg, ds = self.cfg, ctx.dataset
        things = self.thing_classes(ds)
        train = SceneData(ds, "train", cfg.voxel_size, cfg.augment, cfg.input_features, cfg.max_train_scenes,
                          instances=True)
        val = SceneData(ds, cfg.eval_split, cfg.voxel_size, None, cfg.input_features, cfg.max_eval_scenes)
        model = InstSegModel(load_pretrained(ctx, ds.num_classes, cfg), ds.num_classes, things, ds.ignore_index,
                             cfg.offset_weight, cfg.direction_weight, cfg.bn_momentum)  # the head's norm as the trunk's
        keys = ("semantic", "instance_class", "instance_centre", "points")

        def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
            return collate([train.sample(i, r) for (i, _), r in zip(items, rngs)], keys)

        summary = fit(ctx, cfg, model, train, make_batch, ("semantic.", "offset."),
                      lambda m: {"ap50": self.evaluate(m, val, things, ctx.device)["ap50"]})
        metrics = self.evaluate(model, val, things, ctx.device)
        names = list(getattr(ds, "class_names", []))
        return {
            "ap50": metrics["ap50"],
            "ap25": metrics["ap25"],
            "ap": metrics["ap"],
            "per_class_ap50": {(names[c] if c < len(names) else str(c)): v for c, v in metrics["per_class_ap50"].items()},
            "proposals": metrics["proposals"],
            "min_region_size": cfg.min_region_size,
            "cluster_radius": cfg.cluster_radius,
            "min_cluster_points": cfg.min_cluster_points,
            "instance_classes": things,
            "eval_split": cfg.eval_split,
            "eval_scenes": len(val),
            **summary,
        }

    def evaluate(self, model: InstSegModel, data: SceneData, things: Sequence[int],
                 device: torch.device) -> Dict[str, Any]:
        cfg = self.cfg
        gts, preds = [], []
        n_props = 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i in range(len(data)):
                sample = data.sample(i)
                scene = data.scene(i)
                if "instance" not in scene or "instance_label" not in scene:
                    raise KeyError(f"{data.dataset_name}: scene {data.names[i]} of split '{data.split}' has no "
                                   f"instance annotations to evaluate against")
                batch = collate([sample], ())
                logits, offsets = model.predict(batch["coords"].to(device), batch["feats"].to(device))
                logit = logits.float().cpu().numpy()
                label = logit.argmax(1)
                shifted = sample["points"] + offsets.float().cpu().numpy()
                # a proposal's confidence: the mean raw logit of its class (CSC's test clustering)
                props = group_proposals(shifted, label, logit[np.arange(len(label)), label], things,
                                        cfg.cluster_radius, cfg.min_cluster_points)
                inverse, crop = sample["inverse"], sample["crop"]
                n_points = len(scene["points"])
                scene_preds = []
                for members, c, score in props:
                    in_voxel = np.zeros(len(label), dtype=bool)
                    in_voxel[members] = True
                    mask = np.zeros(n_points, dtype=bool)
                    mask[crop] = in_voxel[inverse]
                    scene_preds.append((mask, c + 1, score))
                n_props += len(scene_preds)
                preds.append(scene_preds)
                gts.append(gt_instance_ids(scene["instance"], scene["instance_label"]))
        model.train(was_training)
        out = instance_ap(gts, preds, [c + 1 for c in things], min_region_size=cfg.min_region_size)
        per_class = {c: out["per_class"][c + 1]["ap50"] for c in things}
        if np.isnan(out["ap50"]):
            log.warning("instseg.eval ap50=nan reason=no gt instance of at least min_region_size=%d points in split %s",
                        cfg.min_region_size, data.split)
        log.info("instseg.eval ap50=%.4f ap25=%.4f proposals=%d scenes=%d", out["ap50"], out["ap25"], n_props, len(data))
        return {"ap50": float(out["ap50"]), "ap25": float(out["ap25"]), "ap": float(out["ap"]),
                "per_class_ap50": per_class, "proposals": n_props}
