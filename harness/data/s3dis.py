"""S3DIS (``Stanford3dDataset_v1.2_Aligned_Version``) in its official layout.

``<root>/Area_<n>/<room>/Annotations/<class>_<k>.txt``: one file per annotated object, one point
per line as ``x y z r g b`` (metres in the area's frame, colours 0..255). ``<room>/<room>.txt``
(the whole room) is not read: the annotation files hold the same points, with labels.

Labels: the 13 classes below as train ids 0..12; ``stairs``, which a few real rooms have, is
ignored, as in CSC's pipeline (the recipe's), or counted as ``clutter`` (PointNet's protocol) with
``stairs: clutter``; any other unknown class name is an error.
Each annotation file is one instance: instance ids 1..K in the files' natural order
(``chair_2`` before ``chair_10``). Instance segmentation evaluates all 13 classes.
Splits: train = Areas 1, 2, 3, 4, 6; val = Area 5 (configurable).

The real release has a malformed line (Area_5/hallway_6/Annotations/ceiling_1.txt, line
180389): a line that is not six numbers is skipped with a warning naming the file and the line;
a file where most lines are unreadable is an error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from harness.api import Dataset, DatasetConfig
from harness.registry import DATASETS

log = logging.getLogger(__name__)

IGNORE = -100
CLASS_NAMES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa",
               "bookcase", "board", "clutter")
# annotation class names of the release that are not benchmark classes -> benchmark class
STAIRS = "stairs"
STAIRS_MODES = ("ignore", "clutter")
RELEASE_DIR = "Stanford3dDataset_v1.2_Aligned_Version"


@dataclass
class EmbeddedS3DISConfig:
    seed: int = 0
    # rooms written into Area_1 .. Area_6
    rooms_per_area: List[int] = field(default_factory=lambda: [2, 2, 2, 2, 3, 2])
    # surface sampling density, points per square metre (the release has about 10x more)
    density: float = 500.0


@dataclass
class S3DISConfig(DatasetConfig):
    dataset: str = "s3dis"
    val_area: int = 5
    train_areas: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])
    # the rooms' stairs: "ignore" (CSC's pipeline: label ignored, no instance) or "clutter"
    stairs: str = "ignore"
    embedded: EmbeddedS3DISConfig = field(default_factory=EmbeddedS3DISConfig)


def natural_key(name: str) -> Tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def read_points_txt(path: Path, columns: int = 6, max_bad_fraction: float = 0.5) -> np.ndarray:
    """A whitespace-separated text file of ``columns`` numbers per line, as (N, columns) float64.

    Malformed lines (wrong field count, not numbers, not finite) are skipped with a warning that
    names the file and the 1-based line number; when more than ``max_bad_fraction`` of the
    non-blank lines are malformed the file is corrupt: ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = path.read_bytes()
    if not data.strip():
        return np.zeros((0, columns))
    try:  # fast path: numpy's C parser; any irregular line raises
        arr = np.loadtxt(path, dtype=np.float64, ndmin=2, comments=None)
        if arr.shape[1] == columns and np.all(np.isfinite(arr)):
            return arr
    except ValueError:
        pass
    rows: List[List[float]] = []
    bad: List[Tuple[int, str]] = []
    total = 0
    for lineno, raw in enumerate(data.decode("latin-1").splitlines(), start=1):
        parts = raw.split()
        if not parts:
            continue
        total += 1
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            vals = []
        if len(vals) != columns or not all(np.isfinite(vals)):
            bad.append((lineno, raw))
            continue
        rows.append(vals)
    if bad and len(bad) > max_bad_fraction * total:
        line, text = bad[0]
        raise ValueError(f"{path}: {len(bad)} of {total} lines are not {columns} numbers (first: line {line}: "
                         f"{text[:60]!r}); the file looks corrupt or is not an S3DIS point file")
    for line, text in bad[:10]:
        log.warning("s3dis.skip_line file=%s line=%d text=%r reason=expected-%d-numbers", path, line, text[:60],
                    columns)
    if len(bad) > 10:
        log.warning("s3dis.skip_line file=%s more=%d", path, len(bad) - 10)
    return np.asarray(rows, dtype=np.float64).reshape(-1, columns)


def class_of(path: Path, stairs: str = "ignore") -> int:
    """Train id of an annotation file ``<class>_<k>.txt`` (IGNORE for stairs unless ``stairs`` is
    "clutter")."""
    stem = path.stem
    name = stem.rsplit("_", 1)[0] if "_" in stem else stem
    if name == STAIRS:
        return IGNORE if stairs == "ignore" else CLASS_NAMES.index(stairs)
    if name not in CLASS_NAMES:
        raise ValueError(f"{path}: unknown S3DIS class {name!r} (file names are <class>_<k>.txt with class one of "
                         f"{', '.join(CLASS_NAMES)}, or stairs)")
    return CLASS_NAMES.index(name)


@DATASETS.register("s3dis")
class S3DIS(Dataset):
    Config = S3DISConfig
    version = "2"  # 2: stairs ignored by default
    tasks = ("semseg", "instseg")
    has_frames = False
    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = IGNORE
    instance_classes = tuple(range(len(CLASS_NAMES)))
    voxel_size = 0.05  # the recipe's fine-tuning voxel

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if cfg.stairs not in STAIRS_MODES:
            raise ValueError(f"datasets.s3dis.stairs must be one of {', '.join(STAIRS_MODES)}, got {cfg.stairs!r}")
        if cfg.root is None:
            from harness.data.s3dis_embedded import ensure_embedded_s3dis

            self.root = ensure_embedded_s3dis(Path(cfg.cache_dir), cfg.embedded)
        else:
            root = Path(cfg.root)
            if (root / RELEASE_DIR).is_dir():
                root = root / RELEASE_DIR
            if not root.is_dir():
                raise FileNotFoundError(f"S3DIS root {root} (datasets.s3dis.root) is not a directory")
            self.root = root

    def areas(self, split: str) -> List[int]:
        if split == "train":
            return [int(a) for a in self.cfg.train_areas]
        if split == "val":
            return [int(self.cfg.val_area)]
        raise ValueError(f"S3DIS has splits 'train' and 'val', not {split!r}")

    def scenes(self, split: str) -> List[str]:
        out = []
        for area in self.areas(split):
            d = self.root / f"Area_{area}"
            if not d.is_dir():
                raise FileNotFoundError(f"S3DIS {split} split: {d} not found (train areas "
                                        f"{list(self.cfg.train_areas)}, val area {self.cfg.val_area}, "
                                        f"root {self.root})")
            rooms = sorted((p.name for p in d.iterdir() if (p / "Annotations").is_dir()), key=natural_key)
            if not rooms:
                raise FileNotFoundError(f"S3DIS {split} split: no room with an Annotations/ folder in {d}")
            out += [f"Area_{area}/{r}" for r in rooms]
        return out

    def annotation_files(self, scene: str) -> List[Path]:
        d = self.root / scene / "Annotations"
        if not d.is_dir():
            raise FileNotFoundError(f"S3DIS room {scene}: {d} not found")
        files = sorted((p for p in d.iterdir() if p.suffix == ".txt" and not p.name.startswith(".")),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise FileNotFoundError(f"S3DIS room {scene}: no <class>_<k>.txt file in {d}")
        return files

    def load(self, scene: str) -> Dict[str, Any]:
        pts, cols, sem, inst, labels = [], [], [], [], [IGNORE]
        for path in self.annotation_files(scene):
            cls = class_of(path, self.cfg.stairs)
            arr = read_points_txt(path)
            if len(arr) == 0:
                log.warning("s3dis.empty_annotation file=%s", path)
                continue
            if cls == IGNORE:
                k = 0  # no instance
            else:
                labels.append(cls)
                k = len(labels) - 1
            pts.append(arr[:, :3])
            cols.append(arr[:, 3:6])
            sem.append(np.full(len(arr), cls, np.int64))
            inst.append(np.full(len(arr), k, np.int64))
        if not pts:
            raise ValueError(f"S3DIS room {scene}: every annotation file in "
                             f"{self.root / scene / 'Annotations'} is empty")
        return {
            "scene": scene,
            "points": np.concatenate(pts).astype(np.float32),
            "colors": np.clip(np.rint(np.concatenate(cols)), 0, 255).astype(np.uint8),
            "semantic": np.concatenate(sem),
            "instance": np.concatenate(inst),
            "instance_label": np.asarray(labels, np.int64),
        }

    def required_files(self, scene: str) -> List[Path]:
        return self.annotation_files(scene)
