"""The embedded miniature S3DIS: random rooms written in the release's own layout.

Deterministic from a seed, generated on first use into the cache directory as
``Stanford3dDataset_v1.2_Aligned_Version/Area_<n>/<room>/`` with ``<room>.txt`` and
``Annotations/<class>_<k>.txt`` (``x y z r g b`` per line, three decimals, as the release writes
them). Rooms come from harness.data.rooms with a ceiling, sometimes beams and columns; points are
sampled on the visible surfaces with a little range noise; each room sits at its own place in
its area's frame, as in the aligned release. Generic categories map to the 13 S3DIS classes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from harness.data import synth
from harness.data.cache import ensure_generated
from harness.data.rooms import make_room
from harness.data.s3dis import RELEASE_DIR
from harness.config import to_plain

log = logging.getLogger(__name__)
GENERATOR_VERSION = 1

# generic room category -> S3DIS class (the rest is clutter)
S3DIS_CLASS = {"ceiling": "ceiling", "floor": "floor", "wall": "wall", "beam": "beam", "column": "column",
               "window": "window", "door": "door", "table": "table", "desk": "table", "chair": "chair",
               "sofa": "sofa", "bookshelf": "bookcase", "picture": "board", "board": "board"}
# room kinds of harness.data.rooms -> S3DIS room name prefix
ROOM_NAME = {"office": "office", "living": "lounge", "kitchen": "pantry"}


def ensure_embedded_s3dis(cache_dir: Path, cfg: Any) -> Path:
    params = {"generator": "s3dis", "version": GENERATOR_VERSION, **to_plain(cfg)}
    target = Path(cache_dir) / f"embedded-s3dis-s{params['seed']}"
    return ensure_generated(target, params, lambda tmp: generate(tmp, params)) / RELEASE_DIR


def write_rows(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """``x y z r g b`` lines with three decimals, as the release's files."""
    n = len(xyz)
    flat = np.empty((n, 6), dtype=object)
    flat[:, :3] = np.round(xyz, 3)
    flat[:, 3:] = np.asarray(rgb, dtype=np.int64)
    path.write_text(("%.3f %.3f %.3f %d %d %d\n" * n) % tuple(flat.ravel()))


def generate(root: Path, params: Dict[str, Any]) -> None:
    base = root / RELEASE_DIR
    for a, count in enumerate(params["rooms_per_area"], start=1):
        area_rng = np.random.default_rng([params["seed"], a])
        origin = np.array([area_rng.uniform(-20, 20), area_rng.uniform(-20, 20), 0.0])
        names: Dict[str, int] = {}
        x = 0.0
        for r in range(int(count)):
            rng = np.random.default_rng([params["seed"], a, r])
            kind = str(rng.choice(sorted(ROOM_NAME)))
            room = make_room(rng, kind=kind, ceiling=True, beams=bool(rng.uniform() < 0.5),
                             columns=bool(rng.uniform() < 0.5), height=float(rng.uniform(2.6, 3.1)),
                             wall_items=("door", "window", "picture", "curtain"))
            prefix = ROOM_NAME[kind]
            names[prefix] = names.get(prefix, 0) + 1
            name = f"{prefix}_{names[prefix]}"
            offset = origin + np.array([x, 0.0, 0.0])
            x += room.size[0] + 0.4
            write_room(base / f"Area_{a}" / name, name, room, rng, params, offset)


def write_room(d: Path, name: str, room: Any, rng: np.random.Generator, params: Dict[str, Any],
               offset: np.ndarray) -> None:
    ann = d / "Annotations"
    ann.mkdir(parents=True, exist_ok=True)
    surf = synth.sample_surface(room.scene, float(params["density"]), rng, noise=0.004)
    inst_of_point = room.scene.part_instance[surf["part"]]
    xyz = surf["points"] + offset
    rgb = np.clip(surf["colors"].astype(np.int64) + rng.integers(-6, 7, surf["colors"].shape), 0, 255)
    counts: Dict[str, int] = {}
    all_xyz: List[np.ndarray] = []
    all_rgb: List[np.ndarray] = []
    for k, inst in enumerate(room.scene.instances):
        sel = inst_of_point == k
        if not np.any(sel):
            continue
        cls = S3DIS_CLASS.get(inst.category, "clutter")
        counts[cls] = counts.get(cls, 0) + 1
        write_rows(ann / f"{cls}_{counts[cls]}.txt", xyz[sel], rgb[sel])
        all_xyz.append(xyz[sel])
        all_rgb.append(rgb[sel])
    write_rows(d / f"{name}.txt", np.concatenate(all_xyz), np.concatenate(all_rgb))
