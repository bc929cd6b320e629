"""The machinery PointContrast and CSC share: frame-pair views, matches, the two-view model.

A training item is one mined frame pair (``baselines.pairs``) of a pre-training scene. Each
frame of the pair becomes a view: its depth back-projected into world coordinates (through
the scene's registration, the frame poses), moved by its own random similarity transform
(rotation about z, a small tilt, scale), voxelised, with constant-ones or colour features. The
positives are the voxels of view A and view B whose representative points are nearest
neighbours within ``match_radius_factor x voxel_size`` in world coordinates, so the network
cannot match by coordinates. All randomness of an item comes from its RNG (resumable runs).

Both views of every pair go through the backbone in one call (batch index 2b for view A of
pair b, 2b + 1 for view B); a method's model turns the output rows of the matches into a loss.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from baselines.pairs import (PairsConfig, correspondences, dataset_cache_dir, scene_pairs, transform_points,
                            world_points)
from harness import distributed as dist
from harness.config import OptimizerConfig, ScheduleConfig
from harness.data import augment as aug
from harness.pretrain import PretrainConfig, TrainedMethod
from harness.train import BatchStream

log = logging.getLogger(__name__)


def pair_augment(rotate_axis: str = "z") -> aug.AugmentConfig:
    """The views' augmentation of the public pair loaders, each view its own: CSC's any heading with
    tilts up to pi/64 ("z"), or PointContrast's rotation about a random axis ("free"); no scale
    (neither loader scales) and no flips or colour changes."""
    return aug.AugmentConfig(rotate_z=math.pi, rotate_axis=rotate_axis, tilt=math.pi / 64 if rotate_axis == "z" else 0.0,
                             scale_min=1.0, scale_max=1.0, flip=False, point_dropout=0.0, color_jitter=0.0,
                             color_noise=0.0, max_points=0)


@dataclass
class FramePairConfig(PretrainConfig):
    """Recipe fields of the frame-pair methods (published values: PointContrast / CSC scripts)."""

    steps: int = 60000
    batch_size: int = 32
    voxel_size: float = 0.025
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="sgd", lr=0.1, momentum=0.8,
                                                                               dampening=0.0, weight_decay=1e-4))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="step", gamma=0.99, step_size=250))
    bn_momentum: float = 0.05
    input_features: str = "ones"
    out_channels: int = 32
    # InfoNCE temperature
    tau: float = 0.4
    # Matched pairs sampled for the loss (per batch: PointContrast; per scene: CSC)
    num_matches: int = 4096
    # Positives: nearest point of the other view within this many voxels, after registration
    match_radius_factor: float = 1.5
    # Back-project every N-th depth pixel of a view (1 = all)
    view_depth_stride: int = 1
    # Frames kept in memory (back-projected) per process
    frame_cache: int = 64
    # Frame-pair mining
    pairs: PairsConfig = field(default_factory=PairsConfig)
    # Per-view augmentation (each view draws its own)
    augment: aug.AugmentConfig = field(default_factory=pair_augment)


# ----------------------------------------------------------------------------------------------
# Data


def frame_points(frame: Any, stride: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) float32 of a frame's depth and their colours (N, 3) uint8."""
    from harness.data.frames import sample_colors

    cam = world_points(frame.depth, frame.k_depth, np.eye(4), stride)
    return transform_points(frame.pose, cam), sample_colors(cam, frame.color, frame.k_color)


class FramePairData:
    """The mined frame pairs of the pre-training scenes; ``sample(i, rng)`` builds one pair's views."""

    def __init__(self, dataset: Any, cfg: Any, cache_dir: Optional[Path], progress: bool = False):
        self.dataset = dataset
        self.cfg = cfg
        scenes = list(dataset.scenes("train"))
        if cfg.max_scenes:
            scenes = scenes[: int(cfg.max_scenes)]
        if not scenes:
            raise ValueError(f"{type(dataset).__name__}: the train split has no scenes")
        self.refs: Dict[str, List[Any]] = {}
        self.items: List[Tuple[str, int, int]] = []
        self.mining_seconds = 0.0
        for scene in scenes:
            sp = scene_pairs(dataset, scene, cfg.pairs, cache_dir, progress)
            self.mining_seconds += sp.seconds
            if len(sp.pairs) == 0:
                log.info("pairs.scene_without_pairs scene=%s frames=%d", scene, len(sp.frames))
                continue
            self.refs[scene] = list(dataset.frames(scene))
            self.items += [(scene, int(a), int(b)) for a, b in sp.pairs]
        if not self.items:
            raise ValueError(f"no frame pair with overlap >= {cfg.pairs.min_overlap} in the {len(scenes)} train scenes "
                             f"of {type(dataset).__name__} (pairs.voxel_size={cfg.pairs.voxel_size}); lower "
                             f"pairs.min_overlap or check the frames and poses")
        self.scenes = scenes
        self._frames: "OrderedDict[Tuple[str, int], Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        log.info("pairs.ready scenes=%d with_pairs=%d pairs=%d", len(scenes), len(self.refs), len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def frame(self, scene: str, pos: int) -> Tuple[np.ndarray, np.ndarray]:
        key = (scene, pos)
        if key in self._frames:
            self._frames.move_to_end(key)
            return self._frames[key]
        ref = self.refs[scene][pos]
        frame = ref.load()
        if not np.isfinite(frame.pose).all():
            raise ValueError(f"frame {scene}/{getattr(ref, 'index', pos)} has an invalid pose but is in a mined pair; "
                             f"delete the pair cache under {dataset_cache_dir(self.dataset)}/frame-pairs")
        out = frame_points(frame, int(self.cfg.view_depth_stride))
        self._frames[key] = out
        while len(self._frames) > max(2, int(self.cfg.frame_cache)):
            self._frames.popitem(last=False)
        return out

    def view(self, scene: str, pos: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        from harness.backbones.voxelize import voxelize

        cfg = self.cfg
        world, colors = self.frame(scene, pos)
        T = aug.random_transform(rng, cfg.augment)
        vox = voxelize(aug.apply(T, world), float(cfg.voxel_size), rng=rng)
        col = colors[vox.index]
        if cfg.augment.color_jitter > 0 or cfg.augment.color_noise > 0:
            col = aug.jitter_colors(rng, col, cfg.augment)
        return {"coords": (vox.coords - vox.coords.min(0)).astype(np.int32),
                "feats": aug.input_features(cfg.input_features, col),
                "world": world[vox.index], "transform": T}

    def sample(self, i: int, rng: np.random.Generator) -> Dict[str, Any]:
        scene, a, b = self.items[i]
        va, vb = self.view(scene, a, rng), self.view(scene, b, rng)
        ia, ib = correspondences(va["world"], vb["world"], float(self.cfg.match_radius_factor * self.cfg.voxel_size))
        return {"a": va, "b": vb, "match_a": ia, "match_b": ib, "pair": (scene, a, b)}


def collate_pairs(samples: List[Dict[str, Any]], voxel_size: float) -> Dict[str, Any]:
    """Both views of every pair in one batch (view A of pair b: batch id 2b, view B: 2b + 1; the
    model runs the A views and the B views as two backbone calls)."""
    coords, feats, ma, mb, item, anchor = [], [], [], [], [], []
    offset = 0
    for b, s in enumerate(samples):
        starts = []
        for v, key in enumerate(("a", "b")):
            view = s[key]
            n = len(view["coords"])
            coords.append(np.concatenate([np.full((n, 1), 2 * b + v, np.int32), view["coords"]], 1))
            feats.append(view["feats"])
            starts.append(offset)
            offset += n
        ma.append(s["match_a"] + starts[0])
        mb.append(s["match_b"] + starts[1])
        item.append(np.full(len(s["match_a"]), b, np.int64))
        # anchors in registered (world) coordinates, in voxel units: CSC's shape-context frame
        anchor.append((s["a"]["world"][s["match_a"]] / voxel_size).astype(np.float32))
    return {
        "coords": torch.from_numpy(np.concatenate(coords)),
        "feats": torch.from_numpy(np.concatenate(feats).astype(np.float32)),
        "match_a": torch.from_numpy(np.concatenate(ma).astype(np.int64)),
        "match_b": torch.from_numpy(np.concatenate(mb).astype(np.int64)),
        "match_item": torch.from_numpy(np.concatenate(item)),
        "anchor": torch.from_numpy(np.concatenate(anchor).reshape(-1, 3)),
    }


def sample_rows(n: int, k: int, device: torch.device) -> torch.Tensor:
    """``min(n, k)`` distinct indices of ``range(n)`` from torch's global (CPU) RNG, checkpointed
    by the trainer, so a resumed run draws the same samples on any device."""
    idx = torch.randperm(n)[:k] if n > k else torch.arange(n)
    return idx.to(device)


# ----------------------------------------------------------------------------------------------
# Model and method


class PairModel(nn.Module):
    """The backbone over both views; ``loss(out, batch)`` is the method's."""

    # A loss with collectives (a gather, a global mean) runs on every rank, matches or not.
    collective_loss = False

    def __init__(self, backbone: nn.Module, cfg: Any):
        super().__init__()
        self.backbone = backbone
        self.tau = float(cfg.tau)
        self.num_matches = int(cfg.num_matches)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        out = self.views_forward(batch["coords"], batch["feats"])
        if batch["match_a"].numel() == 0 and not (self.collective_loss and dist.world_size() > 1):
            # no positives in this batch: a zero loss that keeps the graph (no update)
            return {"loss": out.sum() * 0.0, "matches": torch.zeros(())}
        return self.loss(out.float(), batch)

    def views_forward(self, coords: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The backbone over the A views (batch ids 2b), then over the B views (2b + 1), as two
        calls: each view set's BatchNorm statistics are its own, as in the public trainers (which
        run ``model(sinput0)``, then ``model(sinput1)``). Rows come back in the batch's order."""
        is_a = coords[:, 0] % 2 == 0
        out = None
        for rows in (torch.nonzero(is_a).squeeze(1), torch.nonzero(~is_a).squeeze(1)):
            c = coords.index_select(0, rows)
            c = torch.cat([c[:, :1] // 2, c[:, 1:]], 1)
            part = self.backbone(c, feats.index_select(0, rows))
            if out is None:
                out = part.new_empty((len(coords), part.shape[1]))
            out = out.index_copy(0, rows, part)
        return out

    def loss(self, out: torch.Tensor, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The loss dict from the backbone's output rows and the batch's matches."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(out, batch)")


class FramePairMethod(TrainedMethod):
    """A pre-training method on registered frame pairs (PointContrast, CSC)."""

    group = "Multi-scan"
    consumes = ("frame_pairs",)
    Config = FramePairConfig
    Model: type = PairModel

    def build_model(self, ctx: Any) -> nn.Module:
        cfg = self.cfg
        backbone = ctx.build_backbone(in_channels=3, out_channels=int(cfg.out_channels),
                                      bn_momentum=float(cfg.bn_momentum))
        return self.Model(backbone, cfg)

    def pair_data(self, ctx: Any) -> FramePairData:
        cache = dataset_cache_dir(ctx.dataset)
        if cache is None:
            cache = Path(ctx.workdir) / "cache"
        data = FramePairData(ctx.dataset, self.cfg, cache, progress=bool(ctx.progress))
        ctx.extra["frame_pairs"] = {"scenes": len(data.scenes), "scenes_with_pairs": len(data.refs),
                                    "pairs": len(data), "mining_seconds": round(data.mining_seconds, 2)}
        return data

    def batch_stream(self, ctx: Any) -> BatchStream:
        data = self.pair_data(ctx)
        voxel = float(self.cfg.voxel_size)

        def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
            return collate_pairs([data.sample(i, r) for (i, _), r in zip(items, rngs)], voxel)

        return BatchStream(len(data), int(self.cfg.batch_size), ctx.seed, make_batch)
