"""The image-guided method (Janda et al.): pixel-level 2D pre-training, then 2D->3D distillation.

``pretrain(ctx)`` runs two trainings of the shared ``Trainer`` in the job's workdir, each
resumable on its own:

1. ``stage1``: the ResUNet learns 16-d per-pixel features with a pixel-level SimCLR loss on
   single RGB frames (stage1.py); the trained net is written to ``resunet2d.safetensors``.
2. ``stage2``: that net, frozen and re-read from the workdir, gives the targets of a
   point-to-pixel InfoNCE that trains the 3D backbone (+ an MLP head) on back-projected depth
   frames (stage2.py); the 3D side with its head is written to ``stage2_model.safetensors``
   (for the feature pictures).

The export is the backbone alone (``final`` and the head dropped) in the canonical format,
``backbone.safetensors``, loadable by every downstream task.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from harness import distributed as dist
from harness.api import Method, MethodConfig
from harness.pretrain import EXPORT_NAME, export_backbone
from harness.registry import METHODS

from .stage1 import Stage1Config
from .stage2 import Stage2Config

log = logging.getLogger(__name__)

NET2D_NAME = "resunet2d.safetensors"
STAGE2_NAME = "stage2_model.safetensors"


@dataclass
class ImageGuidedConfig(MethodConfig):
    method: str = "image_guided"
    version: str = "1"
    # stage-2 voxel size in metres (recorded in the exported checkpoint)
    voxel_size: float = 0.05
    # backbone input features: RGB/255 - 0.5
    input_features: str = "rgb"
    # width of the backbone's final layer in pre-training (dropped at export)
    out_channels: int = 32
    # BatchNorm momentum of the backbone in pre-training
    bn_momentum: float = 0.05
    # training scenes used by both stages (0 = the whole train split)
    max_scenes: int = 0
    # after pre-training, write the paper's Figure 2 for the first validation scene into the
    # run's report directory (harness visualize features makes it for any scene)
    picture: bool = True
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)


def _curve(path: Path) -> Dict[str, Any]:
    """First and last logged loss of a Trainer's metrics log, and the means of its first and last
    quarters (single logged values are noisy: each batch has other crops and pair counts)."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    q = max(1, len(rows) // 4)
    return {"loss_first": rows[0]["loss"], "loss_first_step": rows[0]["step"], "loss_last": rows[-1]["loss"],
            "loss_last_step": rows[-1]["step"],
            "loss_first_quarter_mean": sum(r["loss"] for r in rows[:q]) / q,
            "loss_last_quarter_mean": sum(r["loss"] for r in rows[-q:]) / q}


@METHODS.register("image_guided")
class ImageGuided(Method):
    group = "Single-scan"
    consumes = ("frames",)
    version = "1"
    Config = ImageGuidedConfig

    def pretrain(self, ctx: Any) -> Path:
        from .frames import list_frames
        from .resunet import load_resunet, save_resunet
        from .stage1 import run_stage1
        from .stage2 import run_stage2, save_stage2

        cfg = self.cfg
        summary: Dict[str, Any] = {}

        frames1 = list_frames(ctx.dataset, cfg.max_scenes, cfg.stage1.frame_stride)
        net2d, r1 = run_stage1(ctx, cfg.stage1, frames1)
        path2d = ctx.workdir / NET2D_NAME  # rank 0 writes it, every rank reads it back
        dist.main_writes(lambda: save_resunet(path2d, net2d, {"steps": r1.steps, "frames": len(frames1)}))
        summary["stage1"] = {"steps": r1.steps, "seconds": round(r1.seconds, 2), "resumed_from": r1.resumed_from,
                             "frames": len(frames1), **_curve(ctx.workdir / "metrics-stage1.jsonl")}
        log.info("image_guided.stage1 done steps=%d seconds=%.1f net=%s", r1.steps, r1.seconds, path2d)

        net2d, _ = load_resunet(path2d)  # stage 2 reads the frozen net back from the workdir
        frames2 = list_frames(ctx.dataset, cfg.max_scenes, cfg.stage2.frame_stride)
        model, r2 = run_stage2(ctx, cfg, frames2, net2d)
        self.model = model
        summary["stage2"] = {"steps": r2.steps, "seconds": round(r2.seconds, 2), "resumed_from": r2.resumed_from,
                             "frames": len(frames2), **_curve(ctx.workdir / "metrics-stage2.jsonl")}
        log.info("image_guided.stage2 done steps=%d seconds=%.1f", r2.steps, r2.seconds)

        b = model.backbone
        dist.main_writes(lambda: save_stage2(ctx.workdir / STAGE2_NAME, model, {
            "backbone": ctx.backbone.name, "layers": list(b.layers), "planes": list(b.planes),
            "in_channels": int(b.in_channels), "out_channels": int(cfg.out_channels),
            "mlp_hidden": int(cfg.stage2.mlp_hidden), "feature_dim": int(net2d.feature_dim),
            "voxel_size": float(cfg.voxel_size), "input_features": cfg.input_features, "seed": ctx.seed,
            "image_size": list(cfg.stage2.image_size) if cfg.stage2.image_size else None}))
        ctx.extra["pretrain"] = summary
        path = self.export(ctx.workdir / EXPORT_NAME, ctx)
        if cfg.picture:
            self._picture(ctx)
        return path

    def _picture(self, ctx: Any) -> None:
        """The feature picture is a side product: a failure to draw it is logged, not fatal."""
        from harness.config import to_plain

        from .visualize import visualize_features

        if not dist.is_main():
            return
        try:
            scene = ctx.dataset.scenes("val")[0]
            png = visualize_features(ctx.workdir, scene, dataset_cfg=to_plain(ctx.dataset.cfg))
            ctx.extra["feature_picture"] = str(png)
            log.info("image_guided.picture file=%s", png)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("image_guided.picture failed=%s: %s", type(exc).__name__, exc)

    def export(self, path: Path, ctx: Any) -> Path:
        return export_backbone(path, self.model.backbone, ctx, "image_guided", self.cfg)
