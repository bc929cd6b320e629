"""What every downstream task shares: scenes -> voxelised batches, backbone loading, results.

One pipeline serves semantic segmentation, instance segmentation and detection (no forked
copies per task): ``SceneData`` loads a split once, and per item augments, crops and voxelises
a scene; ``collate`` batches samples for the backbone; ``load_pretrained`` builds the backbone and
loads the method's exported checkpoint through the one checkpoint loader; ``fit`` trains a task's
model through the one training loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from harness.api import TaskConfig
from harness.config import OptimizerConfig, ScheduleConfig
from harness.data import augment as aug
from harness.train import BatchStream, Trainer

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TaskConfig):
    """Recipe fields shared by every fine-tuning task (CSC's downstream pipeline)."""

    steps: int = 20000
    batch_size: int = 48
    voxel_size: float = 0.02
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.1, momentum=0.9, dampening=0.1))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: aug.AugmentConfig = field(default_factory=aug.AugmentConfig)
    # BatchNorm momentum downstream (bn0..bn4, bntr4..bntr7; blocks keep 0.1 as in the public code)
    bn_momentum: float = 0.02
    # Backbone input features: rgb (RGB/255 - 0.5) or ones (geometry only).
    input_features: str = "rgb"
    # Split evaluated for Table 1.
    eval_split: str = "val"
    # Refuse a checkpoint pre-trained at another voxel size (null = record it, do not refuse).
    expect_voxel_size: Optional[float] = None
    # Scenes to use per split (0 = all); for quick runs.
    max_train_scenes: int = 0
    max_eval_scenes: int = 0


class SceneData:
    """The scenes of one split, loaded once; ``sample(i, rng)`` voxelises (and augments) one.

    ``instances=True`` adds per-voxel instance targets (the instance's class and centre, in the
    sample's frame); ``boxes="oriented"`` or ``"axis_aligned"`` adds the scene's boxes moved by
    the sample's transform (axis-aligned boxes are re-fitted to the moved box's extent, as
    VoteNet does for ScanNet), keeping those with at least one point in the crop.
    """

    def __init__(self, dataset: Any, split: str, voxel_size: float, augment: Optional[aug.AugmentConfig],
                 input_features: str = "rgb", limit: int = 0, instances: bool = False,
                 boxes: Optional[str] = None, sample_points: int = 0):
        if boxes not in (None, "oriented", "axis_aligned"):
            raise ValueError(f"SceneData: boxes must be null, 'oriented' or 'axis_aligned', got {boxes!r}")
        self.dataset = dataset
        self.split = split
        self.names = list(dataset.scenes(split))
        if limit:
            self.names = self.names[:limit]
        if not self.names:
            raise ValueError(f"{type(dataset).__name__}: split '{split}' has no scenes")
        if augment is not None and augment.elastic and boxes is not None:
            raise ValueError("augment.elastic moves points non-rigidly, which boxes cannot follow; leave it empty "
                             "for detection")
        self.voxel_size = voxel_size
        self.augment = augment
        # at most this many of a scene's points, drawn uniformly (VoteNet's random_sampling), in
        # training from the item's RNG, in evaluation from one seeded by the scene's index; 0 = all
        self.sample_points = int(sample_points)
        self.input_features = input_features
        self.instances = instances
        self.boxes = boxes
        self._cache: Dict[int, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def scene(self, i: int) -> Dict[str, Any]:
        if i not in self._cache:
            self._cache[i] = self.dataset.load(self.names[i])
        return self._cache[i]

    def sample(self, i: int, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
        """Voxelised scene ``i``: coords (M,3) int32 >= 0, feats (M,3), per-voxel labels, and
        ``point_index`` (M,) / ``inverse`` (N,) linking voxels and the scene's points (of the crop)."""
        from harness.backbones.voxelize import voxelize

        s = self.scene(i)
        points = np.asarray(s["points"], dtype=np.float32)
        colors = np.asarray(s["colors"])
        T = np.eye(4)
        a = self.augment if rng is not None else None
        if a is not None:
            sel = np.nonzero(aug.dropout_mask(rng, len(points), a.point_dropout, a.dropout_prob))[0]
            moved = aug.elastic_distortions(rng, points[sel], a)
            keep = aug.clip_mask(rng, moved, a.clip_bound, a.clip_shift)
            if a.max_points:
                keep &= aug.crop_mask(rng, np.where(keep[:, None], moved, np.inf), a.max_points)
            sel, moved = sel[keep], moved[keep]
            T = aug.random_transform(rng, a)
        else:
            sel, moved = np.arange(len(points)), points
        if 0 < self.sample_points < len(sel):
            pick = np.sort((rng if rng is not None else np.random.default_rng(i)).choice(
                len(sel), self.sample_points, replace=False))
            sel, moved = sel[pick], moved[pick]
        pts = aug.apply(T, moved)
        col = aug.jitter_colors(rng, colors[sel], a) if a is not None else colors[sel].astype(np.float32)
        semantic = s.get("semantic")
        vox = voxelize(pts, self.voxel_size, labels=None if semantic is None else semantic[sel], mode="vote",
                       ignore_index=-100, rng=rng)
        coords = vox.coords - vox.coords.min(0)
        if a is not None:
            coords = aug.shift_voxels(rng, coords, a.coord_shift)
        out: Dict[str, Any] = {
            "coords": coords.astype(np.int32),
            "feats": aug.input_features(self.input_features, col[vox.index]),
            "points": pts[vox.index],  # voxel representatives, augmented frame
            "point_index": sel[vox.index],  # into the scene's points
            "inverse": vox.inverse,  # crop's points -> voxel
            "crop": sel,
            "transform": T,
            "scene": i,
            "name": self.names[i],
        }
        if semantic is not None:
            out["semantic"] = vox.labels.astype(np.int64)
        if "instance" in s:
            out["instance"] = np.asarray(s["instance"])[sel][vox.index].astype(np.int64)
        if self.instances:
            self._instance_targets(s, sel, pts, vox.index, out)
        if self.boxes is not None:
            self._box_targets(s, points[sel], T, out)
        return out

    def _instance_targets(self, s: Dict[str, Any], sel: np.ndarray, pts: np.ndarray, index: np.ndarray,
                          out: Dict[str, Any]) -> None:
        """Per voxel: ``instance_class`` (its instance's label, ignore for none) and
        ``instance_centre`` (mean of the instance's points in the crop, sample frame)."""
        if "instance" not in s or "instance_label" not in s:
            raise KeyError(f"{self.dataset_name}: scene {self.names[out['scene']]} has no 'instance'/'instance_label' "
                           f"arrays, which instance targets need")
        inst = np.asarray(s["instance"])[sel].astype(np.int64)
        inst_label = np.asarray(s["instance_label"]).astype(np.int64)
        n_ids = max(int(inst.max()) + 1, len(inst_label))
        counts = np.bincount(inst, minlength=n_ids).astype(np.float64)
        sums = np.stack([np.bincount(inst, weights=pts[:, k].astype(np.float64), minlength=n_ids) for k in range(3)], 1)
        centres = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        labels = np.full(n_ids, -100, dtype=np.int64)
        labels[:len(inst_label)] = inst_label
        labels[0] = -100  # id 0 = no instance
        vinst = inst[index]
        out["instance_class"] = labels[vinst]
        out["instance_centre"] = centres[vinst]

    def _box_targets(self, s: Dict[str, Any], crop_points: np.ndarray, T: np.ndarray, out: Dict[str, Any]) -> None:
        if "boxes" not in s or "box_labels" not in s:
            raise KeyError(f"{self.dataset_name}: scene {self.names[out['scene']]} has no 'boxes'/'box_labels' arrays, "
                           f"which detection needs")
        boxes = np.asarray(s["boxes"], dtype=np.float64).reshape(-1, 7)
        labels = np.asarray(s["box_labels"], dtype=np.int64).reshape(-1)
        ids = np.asarray(s["box_instance"], dtype=np.int64).reshape(-1) if "box_instance" in s else None
        if len(boxes) and len(crop_points) < len(s["points"]):
            keep = points_in_boxes(crop_points, boxes).any(0)
            boxes, labels = boxes[keep], labels[keep]
            ids = ids[keep] if ids is not None else None
        out["boxes"] = transform_boxes(T, boxes, axis_aligned=self.boxes == "axis_aligned").astype(np.float32)
        out["box_labels"] = labels
        if ids is not None:
            out["box_instance"] = ids  # the instance each box was fitted to (votes: its own points only)

    @property
    def dataset_name(self) -> str:
        return type(self.dataset).__name__


def transform_boxes(T: np.ndarray, boxes: np.ndarray, axis_aligned: bool = False) -> np.ndarray:
    """Boxes ``(cx, cy, cz, dx, dy, dz, heading)`` moved by a 4x4 similarity transform ``T``.

    The centre is transformed; each extent is scaled by the length of its transformed box axis;
    the heading becomes the direction of the transformed box x axis (a mirror flips it: a box is
    symmetric, so the mirrored box is the box with that heading). ``axis_aligned`` re-fits an
    axis-aligned box to the bird's-eye extent of the moved box (heading 0). Upright boxes are
    assumed: a tilt in ``T`` is not represented (the boxes stay upright).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    if len(b) == 0:
        return b.copy()
    L = np.asarray(T, dtype=np.float64)[:3, :3]
    c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
    zeros = np.zeros_like(c)
    ex = np.stack([c, s, zeros], 1) @ L.T
    ey = np.stack([-s, c, zeros], 1) @ L.T
    ez = np.array([0.0, 0.0, 1.0]) @ L.T
    out = np.empty_like(b)
    out[:, :3] = b[:, :3] @ L.T + np.asarray(T, dtype=np.float64)[:3, 3]
    out[:, 3] = b[:, 3] * np.linalg.norm(ex, axis=1)
    out[:, 4] = b[:, 4] * np.linalg.norm(ey, axis=1)
    out[:, 5] = b[:, 5] * np.linalg.norm(ez)
    out[:, 6] = np.arctan2(ex[:, 1], ex[:, 0])
    if axis_aligned:
        ca, sa = np.abs(np.cos(out[:, 6])), np.abs(np.sin(out[:, 6]))
        dx, dy = out[:, 3].copy(), out[:, 4].copy()
        out[:, 3] = ca * dx + sa * dy
        out[:, 4] = sa * dx + ca * dy
        out[:, 6] = 0.0
    return out


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, K) bool: point n lies in (or on) box k; boxes ``(cx, cy, cz, dx, dy, dz, heading)``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    d = p[:, None, :] - b[None, :, :3]
    c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
    lx = d[..., 0] * c + d[..., 1] * s  # into the box frame (rotate by -heading)
    ly = -d[..., 0] * s + d[..., 1] * c
    return (np.abs(lx) <= b[:, 3] / 2) & (np.abs(ly) <= b[:, 4] / 2) & (np.abs(d[..., 2]) <= b[:, 5] / 2)


def fit(ctx: Any, cfg: Any, model: torch.nn.Module, train: "SceneData",
        make_batch: Callable[[List[tuple], List[np.random.Generator]], Dict[str, Any]],
        head_prefixes: Sequence[str], evaluate: Callable[[torch.nn.Module], Dict[str, float]]) -> Dict[str, Any]:
    """Fine-tune ``model`` on global batches of ``train`` with the task's recipe (``cfg``) in the
    shared ``Trainer``; returns the training summary every task result carries."""
    stream = BatchStream(len(train), cfg.batch_size, ctx.seed, make_batch)
    result = Trainer(model, stream, cfg.steps, cfg.optimizer, cfg.schedule, ctx.workdir, ctx.device, ctx.trainer,
                     name="finetune", head_prefixes=tuple(head_prefixes), evaluate=evaluate,
                     progress=ctx.progress).fit()
    return {"train_loss": result.last.get("loss"), "steps": result.steps, "train_seconds": round(result.seconds, 2)}


def thing_classes(ds: Any, configured: Optional[Sequence[int]], key: str) -> List[int]:
    """Class ids with instances (``configured``, else the dataset's ``instance_classes``), checked
    against the dataset's classes; ``key`` names the config key in errors."""
    classes = configured if configured is not None else getattr(ds, "instance_classes", None)
    if classes is None:
        raise ValueError(f"{key} is null and {type(ds).__name__} has no instance_classes")
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < ds.num_classes]
    if bad:
        raise ValueError(f"{key} {bad} are outside 0..{ds.num_classes - 1} ({type(ds).__name__} has "
                         f"{ds.num_classes} classes)")
    return classes


def collate(samples: Sequence[Dict[str, Any]], keys: Sequence[str] = ("semantic",)) -> Dict[str, Any]:
    """Concatenate samples into backbone input: coords (sum M, 4) int32 with the batch index first."""
    for s in samples:
        lacking = [k for k in keys if k not in s]
        if lacking:
            raise ValueError(f"scene {s.get('name', s.get('scene'))} has no {', '.join(lacking)} labels: its "
                             "release lacks the label files, or its cache was prepared before they were added "
                             "(harness data prepare <dataset> --root ... --force)")
    coords = [np.concatenate([np.full((len(s["coords"]), 1), b, np.int32), s["coords"]], 1)
              for b, s in enumerate(samples)]
    batch: Dict[str, Any] = {
        "coords": torch.from_numpy(np.concatenate(coords)),
        "feats": torch.from_numpy(np.concatenate([s["feats"] for s in samples])),
        "offsets": torch.tensor(np.cumsum([0] + [len(s["coords"]) for s in samples]), dtype=torch.long),
    }
    for k in keys:
        batch[k] = torch.from_numpy(np.concatenate([s[k] for s in samples]))
    return batch


def load_pretrained(ctx: Any, out_channels: int, cfg: Any) -> torch.nn.Module:
    """The backbone with ``out_channels`` outputs, loaded from ``ctx.checkpoint`` (if any).

    The architecture and input channels must match the checkpoint's meta; the voxel size is
    checked only when the recipe sets ``expect_voxel_size`` (the published pipelines fine-tune
    at other voxel sizes than they pre-train, e.g. 2.5 cm -> 2 cm).
    """
    backbone = ctx.build_backbone(in_channels=3, out_channels=out_channels, bn_momentum=cfg.bn_momentum)
    if ctx.checkpoint is not None:
        from harness.backbones.checkpoint import load_backbone

        expect: Dict[str, Any] = {"in_channels": 3, "backbone": ctx.backbone.name}
        if cfg.expect_voxel_size:
            expect["voxel_size"] = float(cfg.expect_voxel_size)
        report = load_backbone(backbone, ctx.checkpoint, expect=expect)
        ctx.extra["checkpoint_load"] = {"loaded": len(report.loaded), "skipped": len(report.skipped),
                                        "missing": len(report.missing)}
    return backbone
