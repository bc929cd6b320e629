"""SUN RGB-D in the official release's per-frame folders, for 3D object detection.

Root: the folder holding ``SUNRGBD/`` (the release, e.g. ``SUNRGBD/kv1/NYUdata/NYU0001/``) and
``SUNRGBDtoolbox/`` (for ``traintestSUNRGBD/allsplit.mat``). Per frame folder:
``image/<name>.jpg``, ``depth/<name>.png`` (the raw depth, which the toolbox's readframeSUNRGBD
and VoteNet read; ``depth_folder: depth_bfx`` reads the hole-filled copy instead),
``intrinsics.txt`` (3x3 K, row-major, MATLAB's 1-based pixel convention),
``extrinsics/<timestamp>.txt`` (the tilt rotation; the last file by name is used, as the toolbox
does) and ``annotation3Dfinal/index.json`` (objects: ``name`` and ``polygon[0]`` with the
bird's-eye corners ``X``, ``Z`` and the vertical extent ``Ymin``, ``Ymax``).

Depth PNGs are 16-bit with the bits rotated: millimetres = ``(raw >> 3) | (raw << 13)`` in 16
bits (not a plain shift: depths of 8.192 m and more keep bits in the low three), then metres,
values above 8 m clamped to 8 m as the toolbox's ``read3dPoints`` does.

Frames follow the toolbox: camera points ``c`` (x right, y down, z forward) from pixel
``(col+1, row+1)``; the annotation frame is ``a = R c`` with R the tilt rotation (gravity along
-Y); the upright frame (x right, y forward, z up) is ``(a_x, a_z, -a_y)``. Points and boxes are
returned in the upright frame. A box: centroid at the middle of polygon corners 1 and 3 and of
the vertical extent; heading = direction from the centroid to the middle of edge 1-2 (the
box's x axis); dx = |corner 3 - corner 2| (along the heading), dy = |corner 2 - corner 1|,
dz = Ymax - Ymin.

Splits (the toolbox's ``allsplit.mat``): train = ``alltrain`` (5285 frames), val = ``alltest``
(5050 frames), as in VoteNet and the benchmark. Classes: the 10 of the detection benchmark.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from harness.api import Dataset, DatasetConfig
from harness.registry import DATASETS

log = logging.getLogger(__name__)

IGNORE = -100
CLASS_NAMES = ("bed", "table", "sofa", "chair", "toilet", "desk", "dresser", "night_stand", "bookshelf", "bathtub")
SPLIT_FILE = "SUNRGBDtoolbox/traintestSUNRGBD/allsplit.mat"
SPLIT_KEYS = {"train": "alltrain", "val": "alltest"}
# upright = P @ annotation frame
P_UPRIGHT = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def decode_depth(raw: np.ndarray) -> np.ndarray:
    """SUN RGB-D depth PNG values -> millimetres (uint16): the 16-bit rotation right by 3."""
    raw = np.asarray(raw).astype(np.uint16)
    return ((raw >> 3) | (raw << 13)).astype(np.uint16)


def encode_depth(mm: np.ndarray) -> np.ndarray:
    """Millimetres (uint16) -> the release's PNG values (the 16-bit rotation left by 3)."""
    mm = np.asarray(mm).astype(np.uint16)
    return ((mm << 3) | (mm >> 13)).astype(np.uint16)


def read_depth(path: Path, max_depth: float = 8.0) -> np.ndarray:
    """(H, W) float32 metres from a release depth PNG (0 = no depth; clamped to ``max_depth``)."""
    try:
        img = Image.open(path)
        raw = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the depth PNG: {exc}") from exc
    if raw.ndim != 2 or raw.dtype not in (np.uint16, np.int32, np.uint32):
        raise ValueError(f"{path}: depth PNG must be 16-bit greyscale, found mode {img.mode} shape {raw.shape}")
    if raw.max(initial=0) > 65535 or raw.min(initial=0) < 0:
        raise ValueError(f"{path}: depth values outside 16 bits")
    depth = decode_depth(raw).astype(np.float32) / 1000.0
    if max_depth > 0:
        depth = np.minimum(depth, np.float32(max_depth))
    return depth


def read_matrix_txt(path: Path, rows: int, cols_ok: Tuple[int, ...]) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        vals = np.asarray(path.read_text().split(), dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: not a matrix of numbers: {exc}") from exc
    for cols in cols_ok:
        if vals.size == rows * cols:
            return vals.reshape(rows, cols)
    raise ValueError(f"{path}: {vals.size} numbers, expected a {rows}x{' or '.join(map(str, cols_ok))} matrix")


def backproject_upright(depth: np.ndarray, K: np.ndarray, R_tilt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Upright-frame points (N,3) of the pixels with depth > 0 and their (row, col) (N,2), toolbox style."""
    rows, cols = np.nonzero(depth > 0)
    z = depth[rows, cols].astype(np.float64)
    x = (cols + 1 - K[0, 2]) * z / K[0, 0]
    y = (rows + 1 - K[1, 2]) * z / K[1, 1]
    cam = np.stack([x, y, z], -1)
    up = np.einsum("ij,kj->ik", cam, P_UPRIGHT @ R_tilt)  # cam @ (P R).T without BLAS threads
    return up, np.stack([rows, cols], -1)


def class_name(raw: str) -> str:
    """The toolbox's class of an object name: text before ':' (minus a trailing '_' or ' ')."""
    if ":" not in raw:
        return raw
    head = raw[: raw.index(":")]
    return head[:-1] if head.endswith(("_", " ")) else head


def polygon_box(poly: Dict[str, Any], where: str) -> np.ndarray:
    """(cx, cy, cz, dx, dy, dz, heading) in the upright frame from an annotation3Dfinal polygon."""
    try:
        X = np.asarray(poly["X"], dtype=np.float64).ravel()
        Z = np.asarray(poly["Z"], dtype=np.float64).ravel()
        ymin, ymax = float(poly["Ymin"]), float(poly["Ymax"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: polygon needs X, Z, Ymin, Ymax: {exc}") from exc
    if len(X) < 3 or len(X) != len(Z):
        raise ValueError(f"{where}: polygon has {len(X)} X and {len(Z)} Z values, expected at least 3 corners")
    p = np.stack([X, Z], -1)  # upright x, y of the corners
    centre = (p[0] + p[2]) / 2.0
    dy = float(np.linalg.norm(p[1] - p[0]))
    dx = float(np.linalg.norm(p[2] - p[1]))
    front = (p[0] + p[1]) / 2.0 - centre
    heading = float(np.arctan2(front[1], front[0]))
    zc = -(ymin + ymax) / 2.0
    return np.array([centre[0], centre[1], zc, dx, dy, abs(ymax - ymin), heading])


@dataclass
class EmbeddedSUNRGBDConfig:
    seed: int = 0
    train_frames: int = 40
    val_frames: int = 12
    image_size: List[int] = field(default_factory=lambda: [160, 120])


DEPTH_FOLDERS = ("depth", "depth_bfx")


@dataclass
class SUNRGBDConfig(DatasetConfig):
    dataset: str = "sunrgbd"
    # the toolbox's split file, relative to root (or absolute)
    split_file: str = SPLIT_FILE
    # depths beyond this many metres are clamped to it (the toolbox's read3dPoints uses 8)
    max_depth: float = 8.0
    # the frame folder's depth images: "depth" (raw, as the toolbox and VoteNet) or "depth_bfx"
    # (the release's hole-filled copy)
    depth_folder: str = "depth"
    embedded: EmbeddedSUNRGBDConfig = field(default_factory=EmbeddedSUNRGBDConfig)


@DATASETS.register("sunrgbd")
class SUNRGBD(Dataset):
    Config = SUNRGBDConfig
    version = "2"  # 2: raw depth/ by default (was depth_bfx/)
    tasks = ("detection",)
    has_frames = False
    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = IGNORE
    instance_classes = tuple(range(len(CLASS_NAMES)))
    voxel_size = 0.025

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if cfg.depth_folder not in DEPTH_FOLDERS:
            raise ValueError(f"datasets.sunrgbd.depth_folder must be one of {', '.join(DEPTH_FOLDERS)}, "
                             f"got {cfg.depth_folder!r}")
        if cfg.root is None:
            from harness.data.sunrgbd_embedded import ensure_embedded_sunrgbd

            self.root = ensure_embedded_sunrgbd(Path(cfg.cache_dir), cfg.embedded)
        else:
            self.root = Path(cfg.root)
            if not self.root.is_dir():
                raise FileNotFoundError(f"SUN RGB-D root {self.root} (datasets.sunrgbd.root) is not a directory")
        self._splits: Optional[Dict[str, List[str]]] = None

    # -- splits ---------------------------------------------------------------------------------
    @property
    def split_path(self) -> Path:
        p = Path(self.cfg.split_file)
        return p if p.is_absolute() else self.root / p

    def scenes(self, split: str) -> List[str]:
        if split not in SPLIT_KEYS:
            raise ValueError(f"SUN RGB-D has splits 'train' and 'val', not {split!r}")
        if self._splits is None:
            self._splits = read_split(self.split_path)
        return list(self._splits[split])

    # -- frames ---------------------------------------------------------------------------------
    def frame_dir(self, scene: str) -> Path:
        return self.root / "SUNRGBD" / scene

    def _one(self, d: Path, pattern: str, last: bool = False) -> Path:
        files = sorted(d.glob(pattern))
        if not files:
            raise FileNotFoundError(f"{d}: no {pattern} file (SUN RGB-D frame folder layout)")
        return files[-1] if last else files[0]

    def frame_files(self, scene: str) -> Dict[str, Path]:
        d = self.frame_dir(scene)
        if not d.is_dir():
            raise FileNotFoundError(f"SUN RGB-D frame {scene}: {d} not found")
        depth_dir = d / self.cfg.depth_folder
        if not depth_dir.is_dir():
            other = next((f for f in DEPTH_FOLDERS if f != self.cfg.depth_folder and (d / f).is_dir()), None)
            raise FileNotFoundError(f"SUN RGB-D frame {scene}: {depth_dir} not found"
                                    + (f" ({other}/ is there: datasets.sunrgbd.depth_folder={other} reads it)"
                                       if other else ""))
        return {"image": self._one(d / "image", "*.jpg"), "depth": self._one(depth_dir, "*.png"),
                "intrinsics": d / "intrinsics.txt", "extrinsics": self._one(d / "extrinsics", "*.txt", last=True),
                "annotation": d / "annotation3Dfinal" / "index.json"}

    def required_files(self, scene: str) -> List[Path]:
        files = self.frame_files(scene)
        return [files[k] for k in ("image", "depth", "intrinsics", "extrinsics")]

    def load(self, scene: str) -> Dict[str, Any]:
        f = self.frame_files(scene)
        K = read_matrix_txt(f["intrinsics"], 3, (3,))
        R = read_matrix_txt(f["extrinsics"], 3, (3, 4))[:, :3]
        depth = read_depth(f["depth"], float(self.cfg.max_depth))
        try:
            rgb = np.asarray(Image.open(f["image"]).convert("RGB"))
        except OSError as exc:
            raise ValueError(f"{f['image']}: cannot read the image: {exc}") from exc
        if rgb.shape[:2] != depth.shape:
            raise ValueError(f"{f['image']}: image is {rgb.shape[1]}x{rgb.shape[0]}, the depth "
                             f"{f['depth'].name} is {depth.shape[1]}x{depth.shape[0]}")
        pts, pix = backproject_upright(depth, K, R)
        boxes, labels = self.read_boxes(f["annotation"])
        return {"scene": scene, "points": pts.astype(np.float32), "colors": rgb[pix[:, 0], pix[:, 1]],
                "boxes": boxes, "box_labels": labels, "intrinsics": K, "tilt": R}

    def read_boxes(self, path: Path) -> Tuple[np.ndarray, np.ndarray]:
        """Boxes and train ids of the benchmark-class objects of an annotation3Dfinal/index.json."""
        if not path.is_file():
            log.info("sunrgbd.no_annotation file=%s", path)
            return np.zeros((0, 7), np.float32), np.zeros(0, np.int64)
        try:
            ann = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        boxes, labels = [], []
        for i, obj in enumerate(ann.get("objects") or []):
            if not obj or not obj.get("polygon"):
                continue
            name = class_name(str(obj.get("name", "")))
            if name not in CLASS_NAMES:
                continue
            try:
                boxes.append(polygon_box(obj["polygon"][0], f"{path} (objects[{i}], {name})"))
            except ValueError as exc:  # one bad polygon must not cost the frame (or stop a prepare)
                log.warning("sunrgbd.bad_polygon skipped: %s", exc)
                continue
            labels.append(CLASS_NAMES.index(name))
        if not boxes:
            return np.zeros((0, 7), np.float32), np.zeros(0, np.int64)
        return np.asarray(boxes, np.float32), np.asarray(labels, np.int64)


def read_split(path: Path) -> Dict[str, List[str]]:
    """train/val frame folders (relative to ``SUNRGBD/``) from the toolbox's allsplit.mat."""
    if not path.is_file():
        raise FileNotFoundError(f"SUN RGB-D split file {path} not found (the toolbox's "
                                f"traintestSUNRGBD/allsplit.mat; set datasets.sunrgbd.split_file)")
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), simplify_cells=True)
    except Exception as exc:  # scipy raises several types for a bad file
        raise ValueError(f"{path}: cannot read the split file: {exc}") from exc
    out: Dict[str, List[str]] = {}
    for split, key in SPLIT_KEYS.items():
        if key not in mat:
            raise ValueError(f"{path}: no '{key}' entry (has {sorted(k for k in mat if not k.startswith('__'))})")
        entries = mat[key]
        entries = [entries] if isinstance(entries, str) else list(np.ravel(entries))
        out[split] = [relative_frame(str(e), path) for e in entries]
    return out


def relative_frame(entry: str, where: Path) -> str:
    """'/n/fs/sun3d/data/SUNRGBD/kv1/NYUdata/NYU0001/' -> 'kv1/NYUdata/NYU0001'."""
    e = entry.strip().replace("\\", "/").rstrip("/")
    if "/SUNRGBD/" in e:
        return e.split("/SUNRGBD/", 1)[1]
    if e.startswith("SUNRGBD/"):
        return e[len("SUNRGBD/"):]
    raise ValueError(f"{where}: split entry {entry!r} does not contain '/SUNRGBD/'")
