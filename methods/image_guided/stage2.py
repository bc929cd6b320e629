"""Stage 2: distil the frozen 2D features into the 3D backbone, one RGB-D frame at a time.

Per frame: the depth map is back-projected to points with the depth intrinsics (in the world
frame through the camera pose, so that z is up and rotations about z are the usual 3D
augmentation); each point's colour comes from the colour image (colour intrinsics) and its
input features are RGB/255 - 0.5. Before any augmentation every point is projected into the
*colour* image (world -> camera with the inverse pose, then the colour intrinsics) and
depth-tested against the depth map; points outside the image or failing the depth test get no
target. Then the 3D augmentations (point dropout, rotation/scale/flip, colour jitter) move
the points; each point keeps its pre-augmentation pixel, so the link to the image survives.
After voxelisation (0.05 m), up to ``points_per_frame`` (2000) voxels with a target are sampled.

The backbone's 32-d output goes through an MLP to 16-d (L2-normalised); the target is the
frozen ResUNet's feature at the point's pixel (bilinear, re-normalised); InfoNCE (tau 0.4)
pairs each point with its own pixel against the other sampled pixels of the global batch.
Runs through the shared ``Trainer`` under the name ``stage2``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import OptimizerConfig, ScheduleConfig
from harness.data import augment as aug
from harness.data.frames import backproject, sample_colors, transform_points, visible
from harness.train import BatchStream, TrainResult, Trainer

from .losses import point_pixel_info_nce
from .resunet import STRIDE, ResUNet

log = logging.getLogger(__name__)


def _stage2_augment() -> aug.AugmentConfig:
    return aug.AugmentConfig(rotate_z=math.pi, tilt=0.0, scale_min=0.8, scale_max=1.2, flip=True,
                             point_dropout=0.2, color_jitter=0.1, color_noise=5.0, max_points=0)


@dataclass
class Stage2Config:
    steps: int = 40000
    # frames per step (global, over all ranks)
    batch_size: int = 8
    # every n-th frame of each recording (as stage 1)
    frame_stride: int = 50
    points_per_frame: int = 2000
    tau: float = 0.4
    # hidden width of the MLP 32 -> hidden -> 16 on the backbone output
    mlp_hidden: int = 32
    # back-project every n-th depth pixel (1 = all) and ignore depth beyond max_depth metres (0 = no limit)
    depth_stride: int = 1
    max_depth: float = 0.0
    # depth test: a point more than this many metres behind the measured surface is occluded
    depth_tolerance: float = 0.05
    # points in the world frame (camera pose; rotations about z = up) or in the camera frame
    world_frame: bool = True
    # colour image fed to the 2D net, [width, height]; null = as stored (padded to a multiple of 32)
    image_size: Optional[List[int]] = field(default_factory=lambda: [320, 240])
    # InfoNCE rows computed at a time (with recomputation); 0 = all at once
    loss_chunk: int = 0
    # 3D augmentations (harness.data.augment.AugmentConfig): rotation, scaling, dropout, colour
    augment: aug.AugmentConfig = field(default_factory=_stage2_augment)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name="sgd", lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-4))
    # exponential decay: lr x0.99 every 1000 steps
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="step", gamma=0.99, step_size=1000))


# ----------------------------------------------------------------------------------------------
# Geometry


def point_pixels(points: np.ndarray, k_color: np.ndarray, width: int, height: int,
                 world_to_camera: Optional[np.ndarray] = None, depth: Optional[np.ndarray] = None,
                 k_depth: Optional[np.ndarray] = None, tolerance: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels (u = column, v = row; centres at integers) of ``points`` in a ``width`` x ``height``
    colour image, and which points have one.

    ``world_to_camera`` (4x4) maps world-frame points to the camera (omit for camera-frame points).
    A point has a pixel when it lies in front of the camera, projects inside the image and, given
    a depth map (with its own intrinsics ``k_depth``), is not more than ``tolerance`` metres behind
    the measured surface at its depth pixel (occluded) nor on an unmeasured one.
    """
    pts = np.asarray(points, dtype=np.float64)
    cam = transform_points(world_to_camera, pts) if world_to_camera is not None else pts
    ok, uv = visible(cam, k_color, width, height, depth=depth, K_depth=k_depth, tolerance=tolerance)
    return ok, uv


def prepare_image(color: np.ndarray, size: Optional[List[int]]) -> Tuple[torch.Tensor, Tuple[float, float]]:
    """(H, W, 3) uint8 -> (3, H', W') float in [0, 1] for the 2D net, and the (sx, sy) factors that map
    original pixel coordinates to it: u' = (u + 0.5) * sx - 0.5. The image is resized to ``size``
    when given, then padded (edge replication) on the right and bottom to a multiple of 32."""
    img = torch.from_numpy(np.array(color, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    h, w = img.shape[-2:]
    sx = sy = 1.0
    if size is not None:
        tw, th = int(size[0]), int(size[1])
        if (tw, th) != (w, h):
            img = F.interpolate(img[None], size=(th, tw), mode="bilinear", align_corners=False, antialias=True)[0]
            sx, sy = tw / w, th / h
            h, w = th, tw
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        img = F.pad(img[None], (0, pw, 0, ph), mode="replicate")[0]
    return img.contiguous(), (sx, sy)


def sample_pixel_features(feats: torch.Tensor, uv: torch.Tensor, valid_hw: Tuple[int, int]) -> torch.Tensor:
    """Bilinear samples of a (D, H, W) feature map at pixel coordinates ``uv`` (N, 2), re-normalised.

    ``valid_hw`` is the unpadded image size; coordinates are clamped to it (border pixels)."""
    h, w = valid_hw
    f = feats[:, :h, :w][None]
    gx = (2.0 * uv[:, 0] + 1.0) / w - 1.0
    gy = (2.0 * uv[:, 1] + 1.0) / h - 1.0
    grid = torch.stack([gx, gy], -1).view(1, 1, -1, 2).to(f.dtype)
    out = F.grid_sample(f, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].t()
    return F.normalize(out, dim=1)


# ----------------------------------------------------------------------------------------------
# Data


def frame_sample(frame: Any, rng: np.random.Generator, cfg: Any, voxel_size: float, input_features: str
                 ) -> Dict[str, Any]:
    """One frame as backbone input plus the pixel of each sampled voxel (see the module doc)."""
    from harness.backbones.voxelize import voxelize

    pts_cam, _ = backproject(frame.depth, frame.k_depth, stride=cfg.depth_stride, max_depth=cfg.max_depth)
    h, w = frame.color.shape[:2]
    image, (sx, sy) = prepare_image(frame.color, cfg.image_size)
    vh, vw = int(round(h * sy)), int(round(w * sx))
    if len(pts_cam) == 0:
        log.warning("stage2.frame empty=%s (no valid depth)", frame.name)
        return {"coords": np.zeros((0, 3), np.int32), "feats": np.zeros((0, 3), np.float32),
                "rows": np.zeros(0, np.int64), "uv": np.zeros((0, 2), np.float32), "image": image,
                "valid_hw": (vh, vw)}
    colors = sample_colors(pts_cam, frame.color, frame.k_color)
    pose = np.asarray(frame.pose, dtype=np.float64)
    if cfg.world_frame and np.isfinite(pose).all():
        pts = transform_points(pose, pts_cam)
        world_to_camera = np.linalg.inv(pose)
    else:  # camera frame (or a frame without a valid pose)
        pts, world_to_camera = pts_cam, None
    ok, uv = point_pixels(pts, frame.k_color, w, h, world_to_camera, frame.depth, frame.k_depth, cfg.depth_tolerance)

    a = cfg.augment
    keep = aug.dropout_mask(rng, len(pts), a.point_dropout)
    sel = np.nonzero(keep)[0]
    T = aug.random_transform(rng, a)
    moved = aug.apply(T, pts[sel].astype(np.float32))
    col = aug.jitter_colors(rng, colors[sel], a)
    vox = voxelize(moved, voxel_size, rng=rng)
    rep = sel[vox.index]  # the original point behind each voxel
    with_target = np.nonzero(ok[rep])[0]
    n = min(int(cfg.points_per_frame), len(with_target))
    rows = np.sort(rng.choice(with_target, n, replace=False)) if n else np.zeros(0, np.int64)
    uv_img = (uv[rep[rows]] + 0.5) * np.array([sx, sy]) - 0.5
    return {
        "coords": (vox.coords - vox.coords.min(0)).astype(np.int32),
        "feats": aug.input_features(input_features, col[vox.index]),
        "rows": rows.astype(np.int64),
        "uv": uv_img.astype(np.float32),
        "image": image,
        "valid_hw": (vh, vw),
    }


def collate_frames(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    shapes = {(tuple(s["image"].shape), tuple(s["valid_hw"])) for s in samples}
    if len(shapes) > 1:
        sizes = sorted({hw for _, hw in shapes})
        raise ValueError(f"stage 2: frames of one batch have different colour image sizes (height, width) {sizes}; "
                         f"set stage2.image_size to resize them to one size")
    coords, rows, img_index = [], [], []
    offset = 0
    for b, s in enumerate(samples):
        coords.append(np.concatenate([np.full((len(s["coords"]), 1), b, np.int32), s["coords"]], 1))
        rows.append(s["rows"] + offset)
        img_index.append(np.full(len(s["rows"]), b, np.int64))
        offset += len(s["coords"])
    return {
        "coords": torch.from_numpy(np.concatenate(coords)),
        "feats": torch.from_numpy(np.concatenate([s["feats"] for s in samples])),
        "rows": torch.from_numpy(np.concatenate(rows)),
        "img_index": torch.from_numpy(np.concatenate(img_index)),
        "uv": torch.from_numpy(np.concatenate([s["uv"] for s in samples])),
        "images": torch.stack([s["image"] for s in samples]),
        "valid_hw": torch.tensor(samples[0]["valid_hw"], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------
# Model


class ProjectionMLP(nn.Module):
    """Backbone output (32) -> hidden -> feature_dim (16), L2-normalised."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.relu(self.fc1(x))), dim=1)


class Stage2Model(nn.Module):
    """The 3D backbone + MLP head trained against the frozen ResUNet (``net2d``)."""

    def __init__(self, backbone: nn.Module, head: ProjectionMLP, net2d: ResUNet, tau: float, loss_chunk: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.net2d = net2d
        for p in self.net2d.parameters():
            p.requires_grad_(False)
        self.net2d.eval()
        self.tau = tau
        self.loss_chunk = loss_chunk

    def train(self, mode: bool = True) -> "Stage2Model":
        super().train(mode)
        self.net2d.eval()  # frozen: its BatchNorm statistics never move
        return self

    def point_features(self, coords: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """(N, 16) unit features of every voxel."""
        return self.head(self.backbone(coords, feats))

    @torch.no_grad()
    def pixel_targets(self, images: torch.Tensor, img_index: torch.Tensor, uv: torch.Tensor,
                      valid_hw: Tuple[int, int]) -> torch.Tensor:
        fmap = self.net2d(images)
        out = uv.new_zeros((len(uv), fmap.shape[1]))
        for b in range(images.shape[0]):
            m = img_index == b
            if m.any():
                out[m] = sample_pixel_features(fmap[b], uv[m], valid_hw)
        return out

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        out = self.backbone(batch["coords"], batch["feats"])
        z3 = self.head(out.index_select(0, batch["rows"]))
        hw = (int(batch["valid_hw"][0]), int(batch["valid_hw"][1]))
        z2 = self.pixel_targets(batch["images"], batch["img_index"], batch["uv"], hw)
        loss = point_pixel_info_nce(z3, z2, self.tau, self.loss_chunk)
        pos_sim = (z3 * z2).sum(1).mean() if len(z3) else loss.detach() * 0
        return {"loss": loss, "pos_sim": pos_sim.detach(), "points": float(len(z3))}


def run_stage2(ctx: Any, cfg: Any, frames: List[Any], net2d: ResUNet) -> Tuple[Stage2Model, TrainResult]:
    """Train the backbone (+ MLP) on ``frames`` against ``net2d`` (frozen), Trainer name ``stage2``."""
    s2 = cfg.stage2
    backbone = ctx.build_backbone(in_channels=3, out_channels=cfg.out_channels, bn_momentum=cfg.bn_momentum)
    torch.manual_seed(ctx.seed + 1)
    head = ProjectionMLP(cfg.out_channels, s2.mlp_hidden, net2d.feature_dim)
    model = Stage2Model(backbone, head, net2d, s2.tau, s2.loss_chunk)

    def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
        return collate_frames([frame_sample(frames[i].load(), rng, s2, cfg.voxel_size, cfg.input_features)
                               for (i, _), rng in zip(items, rngs)])

    stream = BatchStream(len(frames), s2.batch_size, ctx.seed, make_batch)
    trainer = Trainer(model, stream, s2.steps, s2.optimizer, s2.schedule, ctx.workdir, ctx.device, ctx.trainer,
                      name="stage2", progress=ctx.progress)
    result = trainer.fit()
    return model, result


# ----------------------------------------------------------------------------------------------
# The 3D side with its head, for the feature pictures


def save_stage2(path: Path, model: Stage2Model, meta: Dict[str, Any]) -> Path:
    """Backbone (with ``final``) and MLP head, as the pictures need them (the export drops both)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={"meta": json.dumps({"format": "image_guided.stage2", **meta})})
    os.replace(tmp, path)
    return path


def load_stage2(path: Path, backend: str = "torch") -> Tuple[nn.Module, ProjectionMLP, Dict[str, Any]]:
    """(backbone, head, meta) rebuilt from ``save_stage2``'s file (strict loads)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from harness.backbones import build_backbone

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stage-2 model {path} not found (the image-guided pre-training writes it)")
    with safe_open(str(path), "pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    if meta.get("format") != "image_guided.stage2":
        raise ValueError(f"{path}: not an image-guided stage-2 model (metadata format {meta.get('format')!r})")
    state = load_file(str(path))
    backbone = build_backbone(meta["backbone"], in_channels=int(meta["in_channels"]),
                              out_channels=int(meta["out_channels"]), backend=backend, layers=meta["layers"],
                              planes=meta["planes"])
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                             strict=True)
    head = ProjectionMLP(int(meta["out_channels"]), int(meta["mlp_hidden"]), int(meta["feature_dim"]))
    head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}, strict=True)
    return backbone, head, meta
