"""SemanticKITTI in its official layout, for semantic segmentation.

Root: the folder holding ``dataset/sequences/`` (or ``sequences/`` itself). Per sequence
``<nn>``: ``velodyne/<id>.bin`` (float32 x, y, z, remission per point, little-endian),
``labels/<id>.label`` (uint32 per point: lower 16 bits the semantic id, upper 16 the instance
id), ``calib.txt`` (``P0..P3``, ``Tr`` as 3x4 row-major: velodyne -> camera 0) and ``poses.txt``
(per scan a 3x4 row-major camera-0 pose relative to the first scan).

Labels: the official learning map (semantic-kitti.yaml) to 19 classes; 0 (unlabeled, outlier,
other-structure, other-object, ...) becomes IGNORE; train ids are learning ids - 1. Moving
classes map onto their static class. Splits: train = sequences 00-07, 09, 10 (those present;
none present is an error), val = 08. The recipe voxelises at 5 cm.

There is no colour: ``colors`` is the remission scaled to 0..255 grey in all three channels
(``round(255 * clip(remission, 0, 1))``); ``remission`` itself is returned too. ``pose`` is the
velodyne-to-world pose of the scan (``inv(Tr) @ pose @ Tr``; identity when poses are absent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from harness.api import Dataset, DatasetConfig
from harness.registry import DATASETS

log = logging.getLogger(__name__)

IGNORE = -100
CLASS_NAMES = ("car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist",
               "road", "parking", "sidewalk", "other-ground", "building", "fence", "vegetation", "trunk",
               "terrain", "pole", "traffic-sign")
# semantic-kitti.yaml learning_map: raw id -> learning id (0 = ignored)
LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10, 48: 11,
    49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0,
    252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}
# raw id of each train id (the learning_map_inv), for writing predictions back
LEARNING_MAP_INV = (10, 11, 15, 18, 20, 30, 31, 32, 40, 44, 48, 49, 50, 51, 70, 71, 72, 80, 81)
TRAIN_SEQUENCES = ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10")
VAL_SEQUENCES = ("08",)
# things with instances (car .. motorcyclist)
INSTANCE_CLASSES = tuple(range(8))

_LUT = np.full(1 << 16, IGNORE, dtype=np.int64)
for _raw, _learn in LEARNING_MAP.items():
    _LUT[_raw] = _learn - 1 if _learn > 0 else IGNORE


def learning_map(raw_semantic: np.ndarray) -> np.ndarray:
    """Raw SemanticKITTI semantic ids (0..65535) -> train ids 0..18, IGNORE for the rest."""
    return _LUT[np.asarray(raw_semantic, dtype=np.int64)]


def read_scan(path: Path) -> np.ndarray:
    """(N, 4) float32 x, y, z, remission of a velodyne ``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scan not found")
    size = path.stat().st_size
    if size % 16:
        raise ValueError(f"{path}: truncated or not a KITTI scan: {size} bytes is not a multiple of 16 "
                         f"(4 float32 per point); {size // 16} whole points")
    scan = np.fromfile(path, dtype="<f4").reshape(-1, 4)
    if not np.all(np.isfinite(scan)):
        raise ValueError(f"{path}: {int((~np.isfinite(scan)).any(1).sum())} points with NaN or inf")
    return scan


def read_label(path: Path, count: Optional[int] = None) -> np.ndarray:
    """uint32 per point of a ``.label``; ``count`` checks it against the scan's point count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    size = path.stat().st_size
    if size % 4:
        raise ValueError(f"{path}: truncated: {size} bytes is not a multiple of 4 (uint32 per point)")
    label = np.fromfile(path, dtype="<u4")
    if count is not None and len(label) != count:
        raise ValueError(f"{path}: {len(label)} labels, the scan has {count} points")
    return label


def read_calib(path: Path) -> Dict[str, np.ndarray]:
    """``calib.txt`` entries as 4x4 matrices (3x4 rows padded with 0 0 0 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calib.txt not found")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, _, rest = line.partition(":")
        try:
            vals = np.asarray(rest.split(), dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"{path}: line {n}: not numbers: {exc}") from exc
        if vals.size != 12:
            raise ValueError(f"{path}: line {n} ({key.strip()}): {vals.size} numbers, expected 12 (3x4)")
        out[key.strip()] = np.vstack([vals.reshape(3, 4), [0, 0, 0, 1]])
    if "Tr" not in out:
        raise ValueError(f"{path}: no 'Tr:' line (velodyne -> camera 0)")
    return out


def read_poses(path: Path) -> np.ndarray:
    """(S, 4, 4) camera-0 poses of ``poses.txt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: poses.txt not found")
    try:
        vals = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: not 12 numbers per line: {exc}") from exc
    if vals.shape[1] != 12:
        raise ValueError(f"{path}: {vals.shape[1]} numbers per line, expected 12 (3x4 row-major)")
    poses = np.tile(np.eye(4), (len(vals), 1, 1))
    poses[:, :3, :4] = vals.reshape(-1, 3, 4)
    return poses


def velodyne_poses(poses: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Camera-0 poses -> velodyne poses: ``inv(Tr) @ pose @ Tr``."""
    return np.linalg.inv(tr) @ poses @ tr


@dataclass
class EmbeddedKITTIConfig:
    seed: int = 0
    train_scans: int = 30
    val_scans: int = 10
    beams: int = 32
    # horizontal resolution of one revolution (the HDL-64E has about 2000)
    azimuth_steps: int = 768


@dataclass
class SemanticKITTIConfig(DatasetConfig):
    dataset: str = "semantickitti"
    train_sequences: List[str] = field(default_factory=lambda: list(TRAIN_SEQUENCES))
    val_sequences: List[str] = field(default_factory=lambda: list(VAL_SEQUENCES))
    embedded: EmbeddedKITTIConfig = field(default_factory=EmbeddedKITTIConfig)


@DATASETS.register("semantickitti")
class SemanticKITTI(Dataset):
    Config = SemanticKITTIConfig
    version = "1"
    tasks = ("semseg",)
    has_frames = False
    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = IGNORE
    instance_classes = INSTANCE_CLASSES
    voxel_size = 0.05
    absent_class_iou = "zero"  # semantic-kitti-api np_ioueval: tp / (tp + fp + fn + 1e-15) over every class

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if cfg.root is None:
            from harness.data.semantickitti_embedded import ensure_embedded_kitti

            root = ensure_embedded_kitti(Path(cfg.cache_dir), cfg.embedded)
        else:
            root = Path(cfg.root)
            if not root.is_dir():
                raise FileNotFoundError(f"SemanticKITTI root {root} (datasets.semantickitti.root) is not a directory")
        self.root = root
        for cand in (root / "dataset" / "sequences", root / "sequences", *([root] if root.name == "sequences" else [])):
            if cand.is_dir():
                self.sequences_dir = cand
                break
        else:
            raise FileNotFoundError(f"SemanticKITTI: neither {root / 'dataset' / 'sequences'} nor "
                                    f"{root / 'sequences'} exists (root: the folder holding dataset/sequences/, "
                                    "dataset/ itself, or sequences/ itself)")
        self._poses: Dict[str, Optional[np.ndarray]] = {}

    def sequences(self, split: str) -> List[str]:
        if split == "train":
            wanted = [str(s).zfill(2) for s in self.cfg.train_sequences]
        elif split == "val":
            wanted = [str(s).zfill(2) for s in self.cfg.val_sequences]
        else:
            raise ValueError(f"SemanticKITTI has splits 'train' and 'val', not {split!r}")
        present = [s for s in wanted if (self.sequences_dir / s / "velodyne").is_dir()]
        if not present:
            raise FileNotFoundError(f"SemanticKITTI {split} split: none of sequences {', '.join(wanted)} has a "
                                    f"velodyne/ folder under {self.sequences_dir}")
        missing = sorted(set(wanted) - set(present))
        if missing:
            log.info("semantickitti.split split=%s present=%s missing=%s", split, ",".join(present), ",".join(missing))
        return present

    def scenes(self, split: str) -> List[str]:
        out = []
        for seq in self.sequences(split):
            ids = sorted(p.stem for p in (self.sequences_dir / seq / "velodyne").glob("*.bin"))
            out += [f"{seq}/{i}" for i in ids]
        return out

    def _paths(self, scene: str):
        seq, _, sid = scene.partition("/")
        d = self.sequences_dir / seq
        return d, d / "velodyne" / f"{sid}.bin", d / "labels" / f"{sid}.label", int(sid)

    def required_files(self, scene: str) -> List[Path]:
        d, scan, label, _ = self._paths(scene)
        files = [scan]
        if (d / "labels").is_dir():
            files.append(label)
        return files

    def pose(self, scene: str) -> np.ndarray:
        d, _, _, idx = self._paths(scene)
        seq = d.name
        if seq not in self._poses:
            poses = None
            if (d / "poses.txt").is_file() and (d / "calib.txt").is_file():
                poses = velodyne_poses(read_poses(d / "poses.txt"), read_calib(d / "calib.txt")["Tr"])
            self._poses[seq] = poses
        poses = self._poses[seq]
        if poses is None:
            return np.eye(4)
        if idx >= len(poses):
            raise ValueError(f"{d / 'poses.txt'}: {len(poses)} poses, scan {scene} needs index {idx}")
        return poses[idx]

    def load(self, scene: str) -> Dict[str, Any]:
        d, scan_path, label_path, _ = self._paths(scene)
        scan = read_scan(scan_path)
        remission = scan[:, 3].copy()
        grey = np.clip(np.rint(np.clip(remission, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
        out: Dict[str, Any] = {"scene": scene, "points": np.ascontiguousarray(scan[:, :3]),
                               "colors": np.repeat(grey[:, None], 3, 1), "remission": remission,
                               "pose": self.pose(scene)}
        if label_path.is_file():
            label = read_label(label_path, len(scan))
            raw_sem = (label & 0xFFFF).astype(np.int64)
            raw_inst = (label >> 16).astype(np.int64)
            sem = learning_map(raw_sem)
            out["semantic_raw"] = raw_sem
            out["semantic"] = sem
            thing = (raw_inst > 0) & np.isin(sem, INSTANCE_CLASSES)
            keys = raw_sem[thing] * (1 << 16) + raw_inst[thing]
            uniq, inv = np.unique(keys, return_inverse=True)
            instance = np.zeros(len(scan), np.int64)
            instance[thing] = inv.ravel() + 1
            out["instance"] = instance
            out["instance_label"] = np.concatenate([[IGNORE], learning_map(uniq >> 16)]).astype(np.int64)
        elif (d / "labels").is_dir():
            raise FileNotFoundError(f"{label_path}: labels/ exists but this scan's label file is missing")
        return out
