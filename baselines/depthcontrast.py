"""DepthContrast (Zhang et al., ICCV 2021) on the project backbone: scene-level MoCo on single scans.

Data: single depth scans, i.e. the RGB-D frames of the pre-training ScanNet (train split),
back-projected in the camera frame (as the published extraction does; it needs no pose, so the
frames ScanNet marks with invalid poses are usable), frames at least ``frame_stride`` raw frame
indices apart (every 10th frame in the published extraction).
Each scan gives two independently augmented views: random cuboid crop, random cuboid drop,
random resampling to one of ``resample_sizes`` points, x/y flips, a rotation about a random
axis, a random scale, colour jitter; then 5 cm voxels with RGB/255 - 0.5 features, shifted by a
random integer voxel offset (so the two views meet the stride-2 grids at different parities).

Model (MoCo style): the query encoder is the backbone (Res16UNet34C in the published recipe),
global max-pooled per scan, then a 2-layer MLP to a 128-d L2-normalised vector. The key encoder
is a momentum copy of backbone and MLP (parameters ``k = m k + (1 - m) q``, no gradient). A
FIFO queue of ``queue_size`` keys (keys of every batch item, gathered from all ranks in rank
order) gives the negatives; the loss is InfoNCE at temperature ``temperature`` with the key of
the other view of the same scan as the positive (query = view 1, key = view 2, as the
published single-format loss).

Ordering of the momentum update: the shared ``Trainer`` calls ``forward`` and then the
optimiser, so the key encoder is updated at the start of each training ``forward`` from the
query parameters left by the previous optimiser step, before the keys are computed. This is
MoCo's own order (update, then keys), and equals "update after each step" for every step whose
keys are used; only the update after the last step (whose key encoder nobody reads) is not
done. The key encoder and the queue are part of the module (parameters without gradient and
buffers), so the trainer's checkpoints hold them and a resumed run equals an uninterrupted one.

Pooled features: the backbone's pre-``final`` features (``forward_features``, planes[7] wide,
96 for Res16UNet34C). The published network pools its trunk's last decoder features straight
into the MLP; an extra 1x1 layer to ``out_channels`` before a max-pool would only be a
bottleneck the MLP does not need, and it is dropped at export anyway. ``backbone.final`` is
therefore frozen (no gradient, so data-parallel training sees no unused trainable parameter)
and ``out_channels`` only sizes that unused layer.

Short runs (the embedded CPU sweep, a few dozen steps): with m = 0.999 the key encoder stays at
its initialisation for the whole run and the loss does not move; m = 0.99 lets it follow. Keep
``queue_size + batch_size`` below the number of scans, or the queue holds older keys of the
batch's own scans as negatives (a warning says so). Multi-GPU: keys of all ranks are gathered
into the queue; there is no shuffle-BN (the published code skips it for voxel inputs too).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import distributed as dist
from harness.config import OptimizerConfig, ScheduleConfig
from harness.data import augment as aug
from harness.pretrain import PretrainConfig, TrainedMethod
from harness.registry import METHODS
from harness.train import BatchStream

log = logging.getLogger(__name__)

# A scan with fewer valid depth points than this is replaced by the next scan of the list.
MIN_SCAN_POINTS = 100


@dataclass
class DepthContrastConfig(PretrainConfig):
    method: str = "depthcontrast"
    # Published length in epochs over the scans; > 0 sets steps = ceil(epochs * scans / batch_size).
    epochs: int = 1000
    steps: int = 1000
    batch_size: int = 1024
    voxel_size: float = 0.05
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="sgd", lr=0.12, momentum=0.9,
                                                                               weight_decay=1e-4))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine"))
    # Scans are frames at least frame_stride raw frame indices apart.
    frame_stride: int = 10
    max_scan_points: int = 50000
    # Cuboid crop: per-axis fraction of the scan's extent in [crop_min, crop_max] ...
    crop_min: float = 0.5
    crop_max: float = 1.0
    crop_aspect: float = 0.75
    crop_min_points: int = 10000
    crop_tries: int = 100
    drop_fraction: float = 0.2
    resample_sizes: List[int] = field(default_factory=lambda: [5000, 10000, 15000, 20000])
    flip: bool = True
    rotate_axes: str = "xyz"
    rotate_max: float = math.pi
    scale_min: float = 0.8
    scale_max: float = 1.2
    coord_shift: int = 100
    color_jitter: float = 0.1
    color_noise: float = 5.0
    mlp_hidden: int = 256
    embedding_dim: int = 128
    momentum: float = 0.999
    queue_size: int = 131072
    temperature: float = 0.1


# ----------------------------------------------------------------------------------------------
# Augmentations of one scan (explicit RNG: the item's, so resumption redraws the same views)


def crop_fractions(rng: np.random.Generator, lo: float, hi: float, aspect: float, tries: int = 100) -> np.ndarray:
    """Per-axis fractions of the extent, uniform in [lo, hi], redrawn (up to ``tries`` times)
    until at least one pair of axes has a side ratio >= ``aspect``."""
    frac = rng.uniform(lo, hi, 3)
    for _ in range(tries):
        if any(min(frac[a], frac[b]) / max(frac[a], frac[b]) >= aspect for a, b in ((0, 1), (0, 2), (1, 2))):
            break
        frac = rng.uniform(lo, hi, 3)
    return frac


def box_mask(points: np.ndarray, centre: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Points inside the axis-aligned box ``centre +- half`` (faces included)."""
    return np.all(np.abs(points - centre) <= half, axis=1)


def cuboid_crop_mask(rng: np.random.Generator, points: np.ndarray, cfg: Any) -> np.ndarray:
    """DepthContrast's random cuboid: a box of ``crop_fractions`` of the extent around a random
    point, re-centred (up to ``crop_tries`` times) until it holds ``crop_min_points`` points."""
    extent = points.max(0) - points.min(0)
    half = extent * crop_fractions(rng, cfg.crop_min, cfg.crop_max, cfg.crop_aspect) / 2.0
    keep = np.ones(len(points), dtype=bool)
    for _ in range(max(1, cfg.crop_tries)):
        keep = box_mask(points, points[rng.integers(len(points))], half)
        if keep.sum() >= cfg.crop_min_points:
            break
    return keep


def cuboid_drop_mask(rng: np.random.Generator, points: np.ndarray, fraction: float) -> np.ndarray:
    """Drop the points of a box of ``fraction`` of the extent around a random point (none if
    that would drop every point)."""
    if fraction <= 0:
        return np.ones(len(points), dtype=bool)
    half = (points.max(0) - points.min(0)) * fraction / 2.0
    keep = ~box_mask(points, points[rng.integers(len(points))], half)
    return keep if keep.any() else np.ones(len(points), dtype=bool)


def axis_rotation(axis: int, angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` about coordinate axis 0 (x), 1 (y) or 2 (z)."""
    c, s = math.cos(angle), math.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def view_transform(rng: np.random.Generator, cfg: Any) -> np.ndarray:
    """Flips of x and y (p = 0.5 each), a rotation about one of ``rotate_axes`` (drawn uniformly)
    by an angle uniform in [-rotate_max, rotate_max], then an isotropic scale; a 3x3 matrix."""
    M = np.eye(3)
    if cfg.flip:
        for axis in (0, 1):
            if rng.uniform() < 0.5:
                M[axis, axis] = -1.0
    axes = ["xyz".index(a) for a in cfg.rotate_axes]
    if axes:
        M = axis_rotation(axes[int(rng.integers(len(axes)))], rng.uniform(-cfg.rotate_max, cfg.rotate_max)) @ M
    return rng.uniform(cfg.scale_min, cfg.scale_max) * M


def make_view(rng: np.random.Generator, points: np.ndarray, colors: np.ndarray, cfg: Any
              ) -> Tuple[np.ndarray, np.ndarray]:
    """One augmented, voxelised view of a scan: coords (M, 3) int32 >= 0 and feats (M, 3)."""
    from harness.backbones.voxelize import voxelize

    keep = cuboid_crop_mask(rng, points, cfg)
    pts, col = points[keep], colors[keep]
    keep = cuboid_drop_mask(rng, pts, cfg.drop_fraction)
    pts, col = pts[keep], col[keep]
    if cfg.resample_sizes:
        n = int(cfg.resample_sizes[int(rng.integers(len(cfg.resample_sizes)))])
        idx = rng.choice(len(pts), n, replace=len(pts) < n)
        pts, col = pts[idx], col[idx]
    pts = (pts.astype(np.float64) @ view_transform(rng, cfg).T).astype(np.float32)
    jitter = aug.AugmentConfig(color_jitter=cfg.color_jitter, color_noise=cfg.color_noise)
    col = aug.jitter_colors(rng, col, jitter)
    vox = voxelize(pts, cfg.voxel_size, rng=rng)
    coords = aug.shift_voxels(rng, vox.coords - vox.coords.min(0), cfg.coord_shift).astype(np.int32)
    return coords, aug.input_features(cfg.input_features, col[vox.index])


def spaced_frames(refs: Sequence[Any], stride: int) -> List[Any]:
    """The frames (sorted by index) kept greedily so that kept indices are >= ``stride`` apart:
    every stride-th raw frame of a full export, every frame of an export already sparser."""
    kept: List[Any] = []
    for ref in sorted(refs, key=lambda r: r.index):
        if not kept or ref.index - kept[-1].index >= stride:
            kept.append(ref)
    return kept


def collate_views(views: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[torch.Tensor, torch.Tensor]:
    coords = np.concatenate([np.concatenate([np.full((len(c), 1), b, np.int32), c], 1) for b, (c, _) in enumerate(views)])
    feats = np.concatenate([f for _, f in views]).astype(np.float32)
    return torch.from_numpy(coords), torch.from_numpy(feats)


# ----------------------------------------------------------------------------------------------
# MoCo pieces (functions, so the tests check them on tiny tensors)


@torch.no_grad()
def momentum_update_(key: Sequence[torch.Tensor], query: Sequence[torch.Tensor], m: float) -> None:
    """``k <- m k + (1 - m) q`` for each pair of tensors, in place."""
    key, query = list(key), list(query)
    if len(key) != len(query):
        raise ValueError(f"momentum_update_: {len(key)} key tensors but {len(query)} query tensors")
    for k, q in zip(key, query):
        k.mul_(m).add_(q.detach(), alpha=1.0 - m)


@torch.no_grad()
def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (B, D) into the ring buffer ``queue`` (K, D) from ``ptr`` on, wrapping
    around, and advance ``ptr`` by B: the oldest keys are the ones replaced."""
    size, n = queue.shape[0], keys.shape[0]
    if n > size:
        raise ValueError(f"depthcontrast: {n} keys per step exceed queue_size={size}; raise queue_size "
                         "or lower batch_size")
    start = int(ptr)
    idx = (start + torch.arange(n, device=queue.device)) % size
    queue.index_copy_(0, idx, keys.to(queue.dtype))
    ptr.fill_((start + n) % size)


@torch.no_grad()
def enqueue_from_all_ranks_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Enqueue the keys of every rank, in rank order (each rank then holds the same queue);
    with one process, just ``keys``."""
    enqueue_(queue, ptr, dist.gather_with_grad(keys.detach()))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of L2-normalised queries q (B, D) with positives k (B, D) and negatives ``queue``
    (K, D): cross-entropy of ``[q.k, q.queue^T] / temperature`` with target 0. Returns the mean
    loss and the (B, 1 + K) logits."""
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.t()
    logits = torch.cat([pos, neg], 1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), logits


class ProjectionHead(nn.Module):
    """The published voxel trunk's 2-layer head: Linear, Linear, with no non-linearity and no
    BatchNorm between them. DepthContrast's ``res16unet.py`` builds ``SMLP(mlp_dim)``, whose
    ``use_relu`` defaults to False (``models/trunks/smlp.py``); only its point trunk's MLP has a ReLU."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class DepthContrastModel(nn.Module):
    """Query encoder (``backbone`` + ``head``), momentum key encoder, queue; ``forward`` -> loss."""

    def __init__(self, backbone: nn.Module, key_backbone: nn.Module, hidden: int, dim: int, queue_size: int,
                 momentum: float, temperature: float):
        """``key_backbone``: a second backbone of the same architecture (built by the caller, as
        MinkowskiEngine layers do not survive ``copy.deepcopy``); it starts as a copy of ``backbone``."""
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"depthcontrast: momentum must be in [0, 1], got {momentum}")
        if temperature <= 0:
            raise ValueError(f"depthcontrast: temperature must be positive, got {temperature}")
        if queue_size < 1:
            raise ValueError(f"depthcontrast: queue_size must be positive, got {queue_size}")
        self.backbone = backbone
        self.backbone.final.requires_grad_(False)  # pooled features are taken before final
        self.head = ProjectionHead(int(backbone.planes[7]), hidden, dim)
        self.key_backbone = key_backbone
        self.key_backbone.load_state_dict(self.backbone.state_dict())
        self.key_head = ProjectionHead(int(backbone.planes[7]), hidden, dim)
        self.key_head.load_state_dict(self.head.state_dict())
        for p in list(self.key_backbone.parameters()) + list(self.key_head.parameters()):
            p.requires_grad_(False)
        self.momentum, self.temperature = float(momentum), float(temperature)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query_params(self) -> List[torch.Tensor]:
        return list(self.backbone.parameters()) + list(self.head.parameters())

    def key_params(self) -> List[torch.Tensor]:
        return list(self.key_backbone.parameters()) + list(self.key_head.parameters())

    @staticmethod
    def embed(backbone: nn.Module, head: nn.Module, coords: torch.Tensor, feats: torch.Tensor,
              batch_size: int) -> torch.Tensor:
        from harness.backbones.ops import global_pool

        pooled = global_pool(backbone.forward_features(coords, feats), coords[:, 0], "max", batch_size)
        return F.normalize(head(pooled).float(), dim=1)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        n = int(batch["batch_size"])
        if self.training:
            momentum_update_(self.key_params(), self.query_params(), self.momentum)
        q = self.embed(self.backbone, self.head, batch["coords"], batch["feats"], n)
        with torch.no_grad():
            k = self.embed(self.key_backbone, self.key_head, batch["key_coords"], batch["key_feats"], n)
        # A copy: the queue is updated in place below, and backward still needs these negatives.
        loss, logits = info_nce(q, k, self.queue.clone(), self.temperature)
        if self.training:
            enqueue_from_all_ranks_(self.queue, self.queue_ptr, k)
        with torch.no_grad():
            l = logits.detach() * self.temperature
            stats = {"pos": l[:, 0].mean(), "neg": l[:, 1:].mean(),
                     "acc": (l[:, 0] > l[:, 1:].max(1).values).float().mean()}
        return {"loss": loss, **stats}


# ----------------------------------------------------------------------------------------------
# The method


@METHODS.register("depthcontrast")
class DepthContrast(TrainedMethod):
    group = "Single-scan"
    consumes = ("frames",)
    Config = DepthContrastConfig

    def scans(self, ctx: Any) -> List[Any]:
        """The FrameRefs pre-trained on: frames >= frame_stride raw frames apart, of the train scenes."""
        cached = getattr(self, "_scans", None)
        if cached is not None:
            return cached
        cfg = self.cfg
        if cfg.frame_stride < 1:
            raise ValueError(f"depthcontrast.frame_stride must be >= 1, got {cfg.frame_stride}")
        scenes = list(ctx.dataset.scenes("train"))
        if cfg.max_scenes:
            scenes = scenes[:cfg.max_scenes]
        refs = [f for s in scenes for f in spaced_frames(ctx.dataset.frames(s), cfg.frame_stride)]
        if not refs:
            raise ValueError(f"depthcontrast: no frames in the train split of {type(ctx.dataset).__name__} "
                             f"({len(scenes)} scenes)")
        self._scans = refs
        log.info("depthcontrast.scans scenes=%d scans=%d frame_stride=%d", len(scenes), len(refs), cfg.frame_stride)
        return refs

    def load_scan(self, refs: List[Any], i: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Camera-frame points and colours of scan ``i`` (capped at max_scan_points); a scan
        without enough valid depth is replaced by the next one."""
        first = -1
        for j in range(len(refs)):
            pts, col = refs[(i + j) % len(refs)].load().points(world=False)
            first = len(pts) if j == 0 else first
            if len(pts) >= MIN_SCAN_POINTS:
                if j:
                    log.warning("depthcontrast.scan_replaced scan=%s/%d points=%d by=%s/%d", refs[i].scene,
                                refs[i].index, first, refs[(i + j) % len(refs)].scene, refs[(i + j) % len(refs)].index)
                if self.cfg.max_scan_points and len(pts) > self.cfg.max_scan_points:
                    idx = rng.choice(len(pts), self.cfg.max_scan_points, replace=False)
                    pts, col = pts[idx], col[idx]
                return pts, col
        raise ValueError(f"depthcontrast: no scan has {MIN_SCAN_POINTS} valid depth points")

    def batch_stream(self, ctx: Any) -> BatchStream:
        cfg, refs = self.cfg, self.scans(ctx)

        def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
            queries, keys = [], []
            for (i, _), rng in zip(items, rngs):
                pts, col = self.load_scan(refs, i, rng)
                queries.append(make_view(rng, pts, col, cfg))
                keys.append(make_view(rng, pts, col, cfg))
            coords, feats = collate_views(queries)
            key_coords, key_feats = collate_views(keys)
            return {"coords": coords, "feats": feats, "key_coords": key_coords, "key_feats": key_feats,
                    "batch_size": len(items)}

        if cfg.queue_size + cfg.batch_size > len(refs):
            log.warning("depthcontrast.queue_too_long queue_size=%d batch_size=%d scans=%d: the queue holds older "
                        "keys of the batch's own scans (false negatives); keep queue_size + batch_size <= scans",
                        cfg.queue_size, cfg.batch_size, len(refs))
        return BatchStream(len(refs), cfg.batch_size, ctx.seed, make_batch)

    def build_model(self, ctx: Any) -> nn.Module:
        cfg = self.cfg
        if cfg.queue_size < cfg.batch_size:
            raise ValueError(f"depthcontrast: queue_size={cfg.queue_size} is smaller than batch_size="
                             f"{cfg.batch_size} (each step enqueues the whole batch's keys)")
        bad = set(cfg.rotate_axes) - set("xyz")
        if bad:
            raise ValueError(f"depthcontrast.rotate_axes={cfg.rotate_axes!r}: only x, y, z are axes")
        backbone = ctx.build_backbone(in_channels=3, out_channels=cfg.out_channels, bn_momentum=cfg.bn_momentum)
        key_backbone = ctx.build_backbone(in_channels=3, out_channels=cfg.out_channels, bn_momentum=cfg.bn_momentum)
        return DepthContrastModel(backbone, key_backbone, cfg.mlp_hidden, cfg.embedding_dim, cfg.queue_size, cfg.momentum,
                                  cfg.temperature)

    def total_steps(self, ctx: Any) -> int:
        """``steps``, or ceil(epochs * scans / batch_size) when ``epochs`` > 0 (the published unit)."""
        cfg = self.cfg
        if cfg.epochs <= 0:
            return int(cfg.steps)
        n = len(self.scans(ctx))
        steps = max(1, math.ceil(cfg.epochs * n / cfg.batch_size))
        log.info("depthcontrast.steps epochs=%d scans=%d batch_size=%d steps=%d", cfg.epochs, n, cfg.batch_size, steps)
        return steps

    def pretrain(self, ctx: Any) -> Path:
        # The shared pretrain() trains cfg.steps steps; the exported meta then records the steps run.
        self.cfg.steps = self.total_steps(ctx)
        return super().pretrain(ctx)
