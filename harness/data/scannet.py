"""ScanNet v2 in its official layout (and the embedded miniature written in the same layout).

Per scene under ``<root>/scans/<scene>/``: ``<scene>_vh_clean_2.ply`` (mesh with colours),
``<scene>_vh_clean_2.labels.ply`` (per-vertex NYU40 ids), ``<scene>.aggregation.json`` +
``<scene>_vh_clean_2.0.010000.segs.json`` (instances as groups of over-segments, labelled
with raw category names that ``scannetv2-labels.combined.tsv`` maps to NYU40) and
``<scene>.txt`` (``axisAlignment``). Splits: ``<root>/scannetv2_{train,val}.txt``. RGB-D frames
ship inside ``<scene>.sens`` (decoded by harness.data.sens); they are read from the SensReader
export layout (see frames.py): ``frames_root/<scene>/`` when that folder holds an export, else
every ``frame_skip``-th valid frame of the ``.sens`` is exported once into
``<cache_dir>/scannet-frames/`` (locked, atomic) and read from there.

Labels: the 20-class benchmark (NYU40 ids ``VALID_CLASS_IDS``) as train ids 0..19, everything
else ``IGNORE``; instances of the 18 classes without wall and floor; axis-aligned boxes of those
instances (heading 0) after the axis alignment.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from harness.api import Dataset, DatasetConfig
from harness.data.frames import FrameRef, read_matrix
from harness.data.ply import read_ply
from harness.registry import DATASETS

log = logging.getLogger(__name__)

IGNORE = -100
# NYU40 ids of the ScanNet benchmark's 20 classes, in train-id order.
VALID_CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
CLASS_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
               "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
               "bathtub", "otherfurniture")
# Train ids of the 18 instance / detection classes (all but wall and floor).
INSTANCE_CLASSES = tuple(range(2, 20))
NYU40_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
               "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
               "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
               "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
               "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
LABEL_TSV = "scannetv2-labels.combined.tsv"

_NYU40_TO_TRAIN = np.full(256 * 256, IGNORE, dtype=np.int64)
_NYU40_TO_TRAIN[list(VALID_CLASS_IDS)] = np.arange(len(VALID_CLASS_IDS))


def nyu40_to_train(ids: np.ndarray) -> np.ndarray:
    """NYU40 ids -> benchmark train ids 0..19, IGNORE for the others (0 = unannotated included)."""
    return _NYU40_TO_TRAIN[np.asarray(ids, dtype=np.int64)]


@dataclass
class EmbeddedScanNetConfig:
    seed: int = 0
    train_scenes: int = 12
    val_scenes: int = 4
    frames_per_scene: int = 16
    # mesh vertex spacing in metres (real ScanNet meshes are about 1-2 cm)
    mesh_spacing: float = 0.04
    depth_size: List[int] = field(default_factory=lambda: [160, 120])
    color_size: List[int] = field(default_factory=lambda: [320, 240])


@dataclass
class ScanNetConfig(DatasetConfig):
    dataset: str = "scannet"
    # Already exported frames (SensReader layout) per scene; null = <root>/frames. Scenes without
    # an export there are exported from their .sens into the cache on first use.
    frames_root: Optional[str] = None
    # Export every N-th frame of a .sens (frames with an invalid pose are skipped);
    # null = 1 for the embedded miniature, 25 for a real release.
    frame_skip: Optional[int] = None
    # Apply <scene>.txt's axisAlignment to the points (and give boxes in that frame).
    align: bool = True
    embedded: EmbeddedScanNetConfig = field(default_factory=EmbeddedScanNetConfig)


@DATASETS.register("scannet")
class ScanNet(Dataset):
    Config = ScanNetConfig
    # Bump when load() output can change for the same files (invalidates prepared caches).
    version = "3"  # 3: box_instance; semantic labels from the aggregation and the label map
    tasks = ("semseg", "instseg", "detection")
    has_frames = True
    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = IGNORE
    instance_classes = INSTANCE_CLASSES

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.embedded = cfg.root is None
        if self.embedded:
            from harness.data.scannet_embedded import ensure_embedded_scannet

            self.root = ensure_embedded_scannet(Path(cfg.cache_dir), cfg.embedded)
        else:
            self.root = Path(cfg.root)
            if not self.root.is_dir():
                raise FileNotFoundError(f"ScanNet root {self.root} (datasets.scannet.root) is not a directory")
        self.frames_root = Path(cfg.frames_root) if cfg.frames_root else self.root / "frames"
        self._raw_to_nyu40: Optional[Dict[str, int]] = None

    # -- splits ---------------------------------------------------------------------------------
    def scenes(self, split: str) -> List[str]:
        path = self.root / f"scannetv2_{split}.txt"
        if not path.is_file():
            hint = (f"; {self.root} looks like the scans/ folder itself, give its parent" if self.root.name == "scans"
                    else f"; {self.root} is a scene folder, give the release root" if self.root.name.startswith("scene")
                    else "")
            raise FileNotFoundError(f"ScanNet split file {path} not found (expected scannetv2_train.txt and "
                                    f"scannetv2_val.txt in {self.root}, next to scans/; they come from ScanNet's "
                                    f"Tasks/Benchmark/ folder, not from the download script){hint}")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    # -- scenes ---------------------------------------------------------------------------------
    def scene_dir(self, scene: str) -> Path:
        return self.root / "scans" / scene

    def axis_alignment(self, scene: str) -> np.ndarray:
        path = self.scene_dir(scene) / f"{scene}.txt"
        if not path.is_file():  # test scenes ship none; for others the boxes stay in the scan's frame
            log.warning("scannet.no_alignment scene=%s file=%s: points and boxes stay unaligned", scene, path)
            return np.eye(4)
        for line in path.read_text().splitlines():
            if line.startswith("axisAlignment"):
                values = [float(v) for v in line.split("=", 1)[1].split()]
                if len(values) != 16:
                    raise ValueError(f"{path}: axisAlignment has {len(values)} numbers, expected 16")
                return np.asarray(values).reshape(4, 4)
        return np.eye(4)

    def required_files(self, scene: str) -> List[Path]:
        """Files load() cannot do without (labels and instances are optional: test scenes have none)."""
        return [self.scene_dir(scene) / f"{scene}_vh_clean_2.ply"]

    def load(self, scene: str) -> Dict[str, Any]:
        d = self.scene_dir(scene)
        mesh = read_ply(d / f"{scene}_vh_clean_2.ply")
        points = np.stack([mesh["x"], mesh["y"], mesh["z"]], -1).astype(np.float64)
        colors = np.stack([mesh["red"], mesh["green"], mesh["blue"]], -1).astype(np.uint8)
        align = self.axis_alignment(scene) if self.cfg.align else np.eye(4)
        points = (np.einsum("ij,kj->ik", points, align[:3, :3]) + align[:3, 3]).astype(np.float32)
        out: Dict[str, Any] = {"scene": scene, "points": points, "colors": colors, "axis_alignment": align}
        labels_path = d / f"{scene}_vh_clean_2.labels.ply"
        if labels_path.is_file():
            lab = read_ply(labels_path)
            if len(lab["label"]) != len(points):
                raise ValueError(f"{labels_path}: {len(lab['label'])} vertices, the mesh has {len(points)}")
            nyu40 = lab["label"].astype(np.int64)
            agg = d / f"{scene}.aggregation.json"
            segs = d / f"{scene}_vh_clean_2.0.010000.segs.json"
            inst = None
            if agg.is_file() and segs.is_file():
                inst, inst_label, agg_nyu40 = self._instances(scene, agg, segs, nyu40)
                if agg_nyu40 is not None:
                    # The benchmark's ground truth comes from the aggregation and the label map, as
                    # here; labels.ply disagrees in a few released scenes (ids 50, 149 for 39).
                    differ = int((agg_nyu40 != nyu40).sum())
                    if differ:
                        log.info("scannet.labels_from_aggregation scene=%s vertices=%d differ from %s", scene,
                                 differ, labels_path.name)
                    nyu40 = agg_nyu40
            out["nyu40"] = nyu40
            out["semantic"] = nyu40_to_train(nyu40)
            if inst is not None:
                out["instance"] = inst
                out["instance_label"] = inst_label  # train id of each instance id (index = id)
                out["boxes"], out["box_labels"], out["box_instance"] = instance_boxes(points, inst, inst_label,
                                                                                      INSTANCE_CLASSES)
        return out

    def _instances(self, scene: str, agg_path: Path, segs_path: Path, nyu40: np.ndarray):
        try:
            agg = json.loads(agg_path.read_text())
            seg_indices = np.asarray(json.loads(segs_path.read_text())["segIndices"], dtype=np.int64)
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{agg_path.parent}: cannot read instance annotations: {exc}") from exc
        if len(seg_indices) != len(nyu40):
            raise ValueError(f"{segs_path}: {len(seg_indices)} segIndices, the mesh has {len(nyu40)} vertices")
        instance = np.zeros(len(seg_indices), dtype=np.int64)
        labels = [IGNORE]
        # vertex lookup: segment id -> vertices
        order = np.argsort(seg_indices, kind="stable")
        sorted_ids = seg_indices[order]
        raw_map = self.raw_to_nyu40()
        by_label: Dict[str, List[np.ndarray]] = {}  # raw label -> its groups' vertices, in first-seen order
        unknown = set()
        for k, group in enumerate(agg.get("segGroups", []), start=1):
            segs = np.asarray(group["segments"], dtype=np.int64)
            lo = np.searchsorted(sorted_ids, segs, "left")
            hi = np.searchsorted(sorted_ids, segs, "right")
            verts = np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(segs) else np.zeros(0, np.int64)
            instance[verts] = k
            raw = group.get("label", "")
            by_label.setdefault(raw, []).append(verts)
            if raw_map is not None and raw in raw_map:
                nyu = raw_map[raw]
            elif len(verts):  # no label map: the majority NYU40 label of its vertices
                nyu = int(np.bincount(nyu40[verts]).argmax())
                unknown.add(raw)
            else:
                nyu = 0
            labels.append(int(nyu40_to_train(np.array([nyu]))[0]))
        if raw_map is not None and unknown:
            log.warning("scannet.unknown_labels scene=%s labels=%s: not in %s; their objects take the majority "
                        "label of their vertices in the label mesh", scene, ",".join(sorted(unknown)), LABEL_TSV)
        per_vertex = None
        if raw_map is not None:  # the benchmark exporter's semantic labels: by label, in first-seen order
            per_vertex = np.zeros(len(seg_indices), dtype=np.int64)
            for raw, groups in by_label.items():
                nyu = raw_map.get(raw)
                for verts in groups:
                    per_vertex[verts] = nyu if nyu is not None else nyu40[verts]
        return instance, np.asarray(labels, dtype=np.int64), per_vertex

    def raw_to_nyu40(self) -> Optional[Dict[str, int]]:
        """raw_category -> nyu40id from scannetv2-labels.combined.tsv (None when absent)."""
        if self._raw_to_nyu40 is None:
            path = self.root / LABEL_TSV
            if not path.is_file():
                if not getattr(self, "_warned_tsv", False):
                    self._warned_tsv = True
                    log.warning("scannet.no_label_map file=%s: semantic labels come from the label meshes and "
                                "object classes from their vertices' majority label (the release ships this file "
                                "at its root)", path)
                return None
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh, delimiter="\t")
                missing = {"raw_category", "nyu40id"} - set(reader.fieldnames or ())
                if missing:
                    raise ValueError(f"{path}: missing columns {sorted(missing)}")
                self._raw_to_nyu40 = {row["raw_category"]: int(row["nyu40id"] or 0) for row in reader}
        return self._raw_to_nyu40

    # -- frames ---------------------------------------------------------------------------------
    @property
    def frame_skip(self) -> int:
        skip = getattr(self.cfg, "frame_skip", None)
        return int(skip) if skip is not None else (1 if self.embedded else 25)

    def frame_source(self, scene: str) -> Path:
        """Where ``scene``'s frames come from (a SensReader export or the .sens), without reading
        them; FileNotFoundError naming both places when neither is there."""
        d = self.frames_root / scene
        if (d / "pose").is_dir():
            return d
        sens = self.scene_dir(scene) / f"{scene}.sens"
        if not sens.is_file():
            raise FileNotFoundError(f"no frames for {scene}: neither an export in {d} (pose/ missing) nor {sens} "
                                    "(frames are for pre-training; `harness data prepare scannet --no-frames` "
                                    "prepares the scenes alone)")
        return sens

    def frames_dir(self, scene: str) -> Path:
        """The SensReader export of ``scene``: under frames_root, or exported from its .sens now."""
        source = self.frame_source(scene)
        if source.is_dir():
            return source
        sens = source
        from harness.data.cache import ensure_generated
        from harness.data.sens import export_sens

        skip = self.frame_skip
        st = sens.stat()
        key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]
        target = Path(self.cfg.cache_dir) / "scannet-frames" / f"{key}-skip{skip}" / scene
        params = {"exporter": "sens", "version": 1, "source": str(sens.resolve()), "bytes": st.st_size,
                  "mtime_ns": st.st_mtime_ns, "frame_skip": skip}
        target.parent.mkdir(parents=True, exist_ok=True)
        return ensure_generated(target, params, lambda tmp: export_sens(sens, tmp, skip))

    def frames(self, scene: str) -> List[FrameRef]:
        d = self.frames_dir(scene)
        k_color = read_matrix(d / "intrinsic" / "intrinsic_color.txt")[:3, :3]
        k_depth = read_matrix(d / "intrinsic" / "intrinsic_depth.txt")[:3, :3]
        meta = json.loads((d / "export.json").read_text()) if (d / "export.json").is_file() else {}
        scale = float(meta.get("depth_shift", 1000.0))
        sizes = [tuple(meta[k]) if meta.get(k) else None for k in ("color_size", "depth_size")]
        ids = sorted(int(p.stem) for p in (d / "pose").glob("*.txt"))
        return [FrameRef(scene, i, d / "color" / f"{i}.jpg", d / "depth" / f"{i}.png", d / "pose" / f"{i}.txt",
                         k_color, k_depth, scale, *sizes) for i in ids]


def instance_boxes(points: np.ndarray, instance: np.ndarray, instance_label: np.ndarray,
                   classes: tuple) -> tuple:
    """Axis-aligned boxes (K,7) ``(cx, cy, cz, dx, dy, dz, 0)`` of the instances of ``classes``,
    their labels (K,) and instance ids (K,)."""
    boxes, labels, ids = [], [], []
    for k in range(1, len(instance_label)):
        if instance_label[k] not in classes:
            continue
        pts = points[instance == k]
        if len(pts) == 0:
            continue
        lo, hi = pts.min(0), pts.max(0)
        boxes.append(np.concatenate([(lo + hi) / 2, hi - lo, [0.0]]))
        labels.append(instance_label[k])
        ids.append(k)
    if not boxes:
        return np.zeros((0, 7), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.asarray(boxes, np.float32), np.asarray(labels, np.int64), np.asarray(ids, np.int64)
