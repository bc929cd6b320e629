"""The embedded miniature SUN RGB-D: single RGB-D frames written in the release's own layout.

Deterministic from a seed, generated on first use into the cache directory. Each frame is a room
(floor and walls) with furniture of the 10 benchmark classes turned to arbitrary headings plus a
few objects of other classes, seen by a tilted camera (pitch and roll). Written as the release
writes a frame folder, ``SUNRGBD/kv1/NYUdata/NYU<nnnn>/``: ``image/*.jpg``, ``depth/*.png`` and the
same in ``depth_bfx/`` (16-bit, millimetres with the release's 3-bit rotation), ``intrinsics.txt``
(1-based pixel convention), ``extrinsics/<timestamp>.txt`` (the tilt rotation, 3x4),
``annotation3Dfinal/index.json`` (bird's-eye polygon + vertical extent per visible object) and
``scene.txt``; the split as the toolbox's ``SUNRGBDtoolbox/traintestSUNRGBD/allsplit.mat``
(``alltrain``, ``alltest``, ``trainvalsplit``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from harness.data import synth
from harness.data.cache import ensure_generated
from harness.data.rooms import PALETTE, _jitter, shape_of
from harness.config import to_plain
from harness.data.sunrgbd import P_UPRIGHT, SPLIT_FILE, encode_depth
from harness.data.synth import BoxScene, Instance, Part

log = logging.getLogger(__name__)
GENERATOR_VERSION = 1
MAT_PREFIX = "/n/fs/sun3d/data/SUNRGBD/"

# benchmark class -> generic shape of harness.data.rooms (None = defined here)
SHAPE = {"bed": "bed", "table": "table", "sofa": "sofa", "chair": "chair", "toilet": "toilet", "desk": "desk",
         "dresser": "cabinet", "night_stand": None, "bookshelf": "bookshelf", "bathtub": "bathtub"}
SCENES = {  # scene type -> benchmark classes likely in it
    "bedroom": ["bed", "night_stand", "dresser", "chair", "desk", "bookshelf"],
    "living_room": ["sofa", "table", "chair", "bookshelf", "dresser"],
    "office": ["desk", "chair", "table", "bookshelf", "chair"],
    "bathroom": ["toilet", "bathtub", "dresser"],
    "dining_room": ["table", "chair", "chair", "dresser"],
}
DISTRACTORS = ["box", "lamp", "pillow", "garbage_bin"]


def ensure_embedded_sunrgbd(cache_dir: Path, cfg: Any) -> Path:
    params = {"generator": "sunrgbd", "version": GENERATOR_VERSION, **to_plain(cfg)}
    target = Path(cache_dir) / f"embedded-sunrgbd-s{params['seed']}"
    return ensure_generated(target, params, lambda tmp: generate(tmp, params))


def frame_names(params: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    n_train, n_val = int(params["train_frames"]), int(params["val_frames"])
    names = [f"kv1/NYUdata/NYU{i + 1:04d}" for i in range(n_train + n_val)]
    return names[:n_train], names[n_train:]


def generate(root: Path, params: Dict[str, Any]) -> None:
    import scipy.io

    train, val = frame_names(params)
    for i, name in enumerate(train + val):
        rng = np.random.default_rng([params["seed"], i])
        write_frame(root / "SUNRGBD" / name, name, rng, params)
    split = root / SPLIT_FILE
    split.parent.mkdir(parents=True, exist_ok=True)

    def cell(names: List[str]) -> np.ndarray:
        arr = np.empty((1, len(names)), dtype=object)
        arr[0, :] = [MAT_PREFIX + n for n in names]
        return arr

    n_tv = max(1, len(train) // 2)
    scipy.io.savemat(str(split), {"alltrain": cell(train), "alltest": cell(val),
                                  "trainvalsplit": {"train": cell(train[:n_tv]), "val": cell(train[n_tv:])}})


def _night_stand(rng: np.random.Generator):
    w, d, h = rng.uniform(0.4, 0.55), rng.uniform(0.35, 0.45), rng.uniform(0.45, 0.65)
    handle = ((w / 2 - 0.06, -0.02, h * 0.6), (w / 2 + 0.06, 0, h * 0.65), (70, 70, 70))
    return [((0, 0, 0), (w, d, h), None), handle], (w, d)


def _distractor(name: str, rng: np.random.Generator):
    if name == "lamp":
        r, h = rng.uniform(0.1, 0.16), rng.uniform(0.4, 0.6)
        return [((r - 0.02, r - 0.02, 0), (r + 0.02, r + 0.02, h), (60, 60, 60)),
                ((0, 0, h), (2 * r, 2 * r, h + 0.25), (235, 225, 190))], (2 * r, 2 * r)
    if name == "pillow":
        return [((0, 0, 0), (0.5, 0.35, 0.15), (220, 200, 200))], (0.5, 0.35)
    if name == "garbage_bin":
        return [((0, 0, 0), (0.3, 0.3, 0.45), (90, 110, 90))], (0.3, 0.3)
    return shape_of("box", rng)


def build_scene(rng: np.random.Generator) -> Tuple[BoxScene, List[Dict[str, Any]], Tuple[float, float, float], str]:
    """A room with turned furniture; per instance its class and world box (cx, cy, cz, dx, dy, dz, heading)."""
    kind = str(rng.choice(sorted(SCENES)))
    W, D, H = float(rng.uniform(3.5, 5.5)), float(rng.uniform(3.5, 5.5)), float(rng.uniform(2.5, 2.9))
    instances: List[Instance] = []
    parts: List[Part] = []
    objects: List[Dict[str, Any]] = []

    def new_instance(category: str, color) -> int:
        instances.append(Instance(len(instances) + 1, category, color))
        return len(instances) - 1

    t = 0.1
    fi = new_instance("floor", _jitter(rng, PALETTE["floor"][int(rng.integers(3))]))
    parts.append(Part((-t, -t, -t), (W + t, D + t, 0.0), fi, hidden=(0, 1, 2, 3, 4)))
    wall_color = _jitter(rng, PALETTE["wall"][int(rng.integers(3))])
    for lo, hi, inner in [((-t, -t, 0), (0.0, D + t, H), 1), ((W, -t, 0), (W + t, D + t, H), 0),
                          ((0, -t, 0), (W, 0.0, H), 3), ((0, D, 0), (W, D + t, H), 2)]:
        parts.append(Part(lo, hi, new_instance("wall", wall_color), hidden=tuple(f for f in range(6) if f != inner)))
    ci = new_instance("ceiling", (240, 240, 238))
    parts.append(Part((-t, -t, H), (W + t, D + t, H + t), ci, hidden=(0, 1, 2, 3, 5)))

    footprints: List[np.ndarray] = []  # (4, 2) corners of placed objects

    def overlaps(poly: np.ndarray) -> bool:
        if np.any(poly.min(0) < 0.05) or poly[:, 0].max() > W - 0.05 or poly[:, 1].max() > D - 0.05:
            return True
        lo_a, hi_a = poly.min(0), poly.max(0)
        return any(np.all(lo_a < f.max(0) + 0.05) and np.all(f.min(0) - 0.05 < hi_a) for f in footprints)

    wanted = list(SCENES[kind]) + [str(rng.choice(DISTRACTORS)) for _ in range(int(rng.integers(1, 3)))]
    for cls in wanted:
        if cls in SHAPE:
            shape, (w, d) = (_night_stand(rng) if SHAPE[cls] is None else shape_of(SHAPE[cls], rng))
            palette = PALETTE["cabinet" if SHAPE[cls] in (None, "cabinet") else SHAPE[cls]]
        else:
            shape, (w, d) = _distractor(cls, rng)
            palette = PALETTE["box"]
        h = max(hi[2] for _, hi, _ in shape)
        for _ in range(40):
            yaw = float(rng.uniform(-np.pi, np.pi))
            cx, cy = float(rng.uniform(0.3, W - 0.3)), float(rng.uniform(0.3, D - 0.3))
            c, s = np.cos(yaw), np.sin(yaw)
            rot = np.array([[c, -s], [s, c]])
            local = np.array([[-w / 2, -d / 2], [w / 2, -d / 2], [w / 2, d / 2], [-w / 2, d / 2]])
            poly = local @ rot.T + [cx, cy]
            if overlaps(poly):
                continue
            footprints.append(poly)
            ii = new_instance(cls, _jitter(rng, palette[int(rng.integers(len(palette)))]))
            for lo, hi, col in shape:
                pc = np.array([(lo[0] + hi[0]) / 2 - w / 2, (lo[1] + hi[1]) / 2 - d / 2])
                wc = rot @ pc + [cx, cy]
                half = np.array([(hi[0] - lo[0]) / 2, (hi[1] - lo[1]) / 2])
                parts.append(Part((wc[0] - half[0], wc[1] - half[1], lo[2]), (wc[0] + half[0], wc[1] + half[1], hi[2]),
                                  ii, hidden=(4,) if lo[2] <= 1e-9 else (), color=_jitter(rng, col, 8) if col else None,
                                  yaw=yaw))
            # the box's x axis is the object's front (local -y), its extent there is d
            objects.append({"instance": ii, "class": cls,
                            "box": np.array([cx, cy, h / 2, d, w, h, yaw - np.pi / 2])})
            break
    return BoxScene.build(parts, instances), objects, (W, D, H), kind


def camera(rng: np.random.Generator, size: Tuple[float, float, float]) -> np.ndarray:
    """A tilted camera (pitch down 5-30 degrees, roll +-4) near a wall, looking into the room."""
    W, D, _ = size
    side = int(rng.integers(4))
    along = float(rng.uniform(0.3, 0.7))
    eye_xy = {0: (0.25, along * D), 1: (W - 0.25, along * D), 2: (along * W, 0.25), 3: (along * W, D - 0.25)}[side]
    eye = np.array([eye_xy[0], eye_xy[1], rng.uniform(1.1, 1.6)])
    target = np.array([W / 2 + rng.uniform(-0.6, 0.6), D / 2 + rng.uniform(-0.6, 0.6), 0.0])
    horiz = float(np.linalg.norm(target[:2] - eye[:2]))
    pitch = np.deg2rad(rng.uniform(5, 30))
    target[2] = eye[2] - horiz * np.tan(pitch)
    pose = synth.look_at(eye, target)
    roll = np.deg2rad(rng.uniform(-4, 4))
    c, s = np.cos(roll), np.sin(roll)
    pose[:3, :3] = pose[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return pose


def upright_frame(pose: np.ndarray) -> np.ndarray:
    """World -> upright rotation (3x3): z up, y along the camera's horizontal viewing direction."""
    fwd = pose[:3, 2]
    psi = np.arctan2(fwd[1], fwd[0])
    y = np.array([np.cos(psi), np.sin(psi), 0.0])
    x = np.array([np.sin(psi), -np.cos(psi), 0.0])
    return np.stack([x, y, [0.0, 0.0, 1.0]])  # rows: the upright axes in world coordinates


def write_frame(d: Path, name: str, rng: np.random.Generator, params: Dict[str, Any]) -> None:
    scene, objects, size, kind = build_scene(rng)
    pose = camera(rng, size)
    w, h = (int(v) for v in params["image_size"])
    K = synth.intrinsics(w, h, 0.82 * w)
    depth, color, part = synth.render_rgbd(scene, K, pose, w, h, max_depth=12.0)
    U = upright_frame(pose)  # u = U (x_world - eye)
    tilt = P_UPRIGHT.T @ U @ pose[:3, :3]  # annotation frame a = tilt @ camera
    stem = d.name
    for sub in ("image", "depth", "depth_bfx", "extrinsics", "annotation3Dfinal"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(color).save(d / "image" / f"{stem}.jpg", quality=92)
    mm = np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16)
    png = encode_depth(mm)
    Image.fromarray(png).save(d / "depth_bfx" / f"{stem}.png")
    Image.fromarray(png).save(d / "depth" / f"{stem}.png")
    K_file = np.array([[K[0, 0], 0, K[0, 2] + 1], [0, K[1, 1], K[1, 2] + 1], [0, 0, 1]])  # 1-based pixels
    (d / "intrinsics.txt").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in K_file) + "\n")
    ext = np.hstack([tilt, np.zeros((3, 1))])
    stamp = f"2014{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}{int(rng.integers(0, 1e6)):06d}"
    (d / "extrinsics" / f"{stamp}.txt").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in ext) + "\n")
    (d / "scene.txt").write_text(kind)

    inst_of_pixel = np.where(part >= 0, scene.part_instance[np.maximum(part, 0)], -1)
    counts = np.bincount(inst_of_pixel[inst_of_pixel >= 0].ravel(), minlength=len(scene.instances))
    eye = pose[:3, 3]
    annotated = []
    for obj in objects:
        if counts[obj["instance"]] < 25:  # annotators label what they can see
            continue
        cx, cy, cz, dx, dy, dz, heading = obj["box"]
        c_u = U @ (np.array([cx, cy, cz]) - eye)
        head_u = heading - np.arctan2(U[0, 1], U[0, 0])
        hx = np.array([np.cos(head_u), np.sin(head_u)])
        hy = np.array([-hx[1], hx[0]])
        ctr = c_u[:2]
        corners = [ctr + dx / 2 * hx - dy / 2 * hy, ctr + dx / 2 * hx + dy / 2 * hy,
                   ctr - dx / 2 * hx + dy / 2 * hy, ctr - dx / 2 * hx - dy / 2 * hy]
        annotated.append({"name": obj["class"], "polygon": [{
            "X": [round(float(p[0]), 6) for p in corners], "Z": [round(float(p[1]), 6) for p in corners],
            "Ymin": round(float(-(c_u[2] + dz / 2)), 6), "Ymax": round(float(-(c_u[2] - dz / 2)), 6),
            "rectangle": True}]})
    (d / "annotation3Dfinal" / "index.json").write_text(json.dumps(
        {"name": name, "date": "embedded", "objects": annotated, "frames": [], "conflictList": [],
         "fileList": [f"image/{stem}.jpg"]}))
