"""Semantic segmentation: backbone + its 1x1 ``final`` layer as the head, cross-entropy, mIoU.

Recipe shape of CSC's downstream pipeline (SGD, poly schedule, rotation/scale/flip/colour
augmentations); sizes from config. mIoU is computed on the original points of the evaluation
split through the inverse voxel map (``evaluate_on: points``), or on voxels as CSC reports it
(``evaluate_on: voxels``); the result records which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from harness import distributed as dist
from harness.api import Task
from harness.config import OptimizerConfig
from harness.metrics import confusion_matrix, iou_from_confusion
from harness.registry import TASKS
from harness.tasks.common import FinetuneConfig, SceneData, collate, fit, load_pretrained

log = logging.getLogger(__name__)


@dataclass
class SemSegConfig(FinetuneConfig):
    task: str = "semseg"
    # ScanNet recipe: SGD lr 0.8, momentum 0.9, dampening 0.1, wd 1e-4, poly 0.9, batch 48, 2 cm, 20k it
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.8, momentum=0.9, dampening=0.1,
                                                                               weight_decay=1e-4))
    evaluate_on: str = "points"  # points | voxels


class SegModel(nn.Module):
    def __init__(self, backbone: nn.Module, ignore_index: int):
        super().__init__()
        self.backbone = backbone
        self.ignore_index = ignore_index

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        logits = self.backbone(batch["coords"], batch["feats"])
        target = batch["semantic"]
        if dist.world_size() > 1:
            # the mean over the labelled points of every rank (ranks hold different numbers)
            labelled = int((target != self.ignore_index).sum())
            per = nn.functional.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
            return {"loss": dist.global_mean(per / max(labelled, 1), labelled)}
        loss = nn.functional.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        return {"loss": loss}


@TASKS.register("semseg")
class SemanticSegmentation(Task):
    Config = SemSegConfig
    metric = "miou"

    def run(self, ctx: Any) -> Dict[str, Any]:
        cfg, ds = self.cfg, ctx.dataset
        if cfg.evaluate_on not in ("points", "voxels"):
            raise ValueError(f"semseg.evaluate_on must be 'points' or 'voxels', got {cfg.evaluate_on!r}")
        train = SceneData(ds, "train", cfg.voxel_size, cfg.augment, cfg.input_features, cfg.max_train_scenes)
        val = SceneData(ds, cfg.eval_split, cfg.voxel_size, None, cfg.input_features, cfg.max_eval_scenes)
        model = SegModel(load_pretrained(ctx, ds.num_classes, cfg), ds.ignore_index)

        def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
            return collate([train.sample(i, r) for (i, _), r in zip(items, rngs)])

        summary = fit(ctx, cfg, model, train, make_batch, ("backbone.final.",),
                      lambda m: {"miou": self.evaluate(m, val, ctx.device)["miou"]})
        model.eval()
        with torch.no_grad():
            metrics = self.evaluate(model, val, ctx.device)
        return {
            "miou": metrics["miou"],
            "per_class": {name: v for name, v in zip(ds.class_names, metrics["per_class"])},
            "evaluated_on": cfg.evaluate_on,
            "eval_split": cfg.eval_split,
            "eval_scenes": len(val),
            **summary,
        }

    def evaluate(self, model: SegModel, data: SceneData, device: torch.device) -> Dict[str, Any]:
        """mIoU of ``model`` on ``data``. Several processes: each rank evaluates every world-th
        scene and the confusion matrices (integer counts) are summed, so the value is exactly
        that of one process; every rank must call this."""
        num_classes, ignore = data.dataset.num_classes, data.dataset.ignore_index
        cm = np.zeros((num_classes, num_classes + 1), dtype=np.int64)  # see confusion_matrix
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i in dist.shard(len(data)):
                sample = data.sample(i)
                batch = collate([sample])
                logits = model.backbone(batch["coords"].to(device), batch["feats"].to(device))
                voxel_pred = logits.argmax(1).cpu().numpy()
                if self.cfg.evaluate_on == "points":
                    pred = voxel_pred[sample["inverse"]]
                    gt = np.asarray(data.scene(i)["semantic"])[sample["crop"]]
                else:
                    pred, gt = voxel_pred, sample["semantic"]
                cm = cm + confusion_matrix(pred, gt, num_classes, ignore)
        model.train(was_training)
        out = iou_from_confusion(dist.sum_array(cm), data.dataset.absent_class_iou)
        return {"miou": float(out["miou"]), "per_class": [float(v) for v in out["per_class"]]}
