"""The embedded miniature SemanticKITTI: spinning-lidar scans of synthetic streets, official layout.

Deterministic from a seed, generated on first use into the cache directory as
``dataset/sequences/<nn>/`` with ``velodyne/<id>.bin`` (float32 x, y, z, remission),
``labels/<id>.label`` (uint32: raw semantic id | instance id << 16), ``calib.txt`` (P0..P3, Tr),
``poses.txt`` (camera-0 poses relative to the first scan, as SemanticKITTI's) and ``times.txt``.
Sequence 00 (train) and 08 (val) are two different streets. A street is boxes: road with lane
markings, raised sidewalks, terrain strips, buildings with gaps, hedges, fences, trees (trunk +
canopy), street lights and signs, parked and oncoming cars (turned a little), pedestrians,
bicycles and the odd kiosk (other-structure, ignored by the learning map). A 32-beam lidar
(-25 to +3 degrees, ``azimuth_steps`` per revolution) drives along it at about 9 m/s, 10 Hz;
remission depends on the material and the incidence angle, in steps of 0.01 as the release's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from harness.data import synth
from harness.data.cache import ensure_generated
from harness.config import to_plain
from harness.data.synth import BoxScene, Instance, Part

log = logging.getLogger(__name__)
GENERATOR_VERSION = 1

# category -> (raw SemanticKITTI id, base reflectivity, colour for the box scene)
CATEGORY = {
    "road": (40, 0.22, (80, 80, 80)), "lane-marking": (60, 0.65, (240, 240, 240)),
    "sidewalk": (48, 0.30, (160, 160, 150)), "parking": (44, 0.24, (90, 90, 95)),
    "terrain": (72, 0.32, (120, 140, 70)), "building": (50, 0.36, (180, 160, 140)),
    "vegetation": (70, 0.22, (60, 120, 50)), "trunk": (71, 0.18, (90, 70, 50)),
    "fence": (51, 0.28, (140, 140, 140)), "pole": (80, 0.40, (120, 120, 125)),
    "traffic-sign": (81, 0.92, (220, 220, 40)), "car": (10, 0.12, (40, 60, 140)),
    "person": (30, 0.20, (150, 100, 80)), "bicycle": (11, 0.25, (200, 30, 30)),
    "other-structure": (52, 0.30, (170, 120, 120)),
}
THINGS = {"car", "person", "bicycle"}
ELEVATION_RANGE = (-25.0, 3.0)
SENSOR_HEIGHT = 1.73
# velodyne -> camera 0, KITTI's axis convention (camera: x right, y down, z forward)
TR = np.array([[0.0, -1.0, 0.0, -0.004], [0.0, 0.0, -1.0, -0.076], [1.0, 0.0, 0.0, -0.272], [0, 0, 0, 1.0]])
P_CAM = np.array([[718.856, 0.0, 607.1928, 0.0], [0.0, 718.856, 185.2157, 0.0], [0.0, 0.0, 1.0, 0.0]])
SEQUENCES = {"train": "00", "val": "08"}


def ensure_embedded_kitti(cache_dir: Path, cfg: Any) -> Path:
    params = {"generator": "semantickitti", "version": GENERATOR_VERSION, **to_plain(cfg)}
    target = Path(cache_dir) / f"embedded-semantickitti-s{params['seed']}"
    return ensure_generated(target, params, lambda tmp: generate(tmp, params))


def generate(root: Path, params: Dict[str, Any]) -> None:
    for k, (split, count) in enumerate((("train", params["train_scans"]), ("val", params["val_scans"]))):
        seq = SEQUENCES[split]
        rng = np.random.default_rng([params["seed"], int(seq)])
        write_sequence(root / "dataset" / "sequences" / seq, int(count), rng, params)


class Street:
    """A street of boxes along +x, centred on y = 0; instance categories from CATEGORY."""

    def __init__(self, rng: np.random.Generator, x0: float, x1: float):
        self.rng = rng
        self.parts: List[Part] = []
        self.instances: List[Instance] = []
        self.x0, self.x1 = x0, x1
        self._build()
        self.scene = BoxScene.build(self.parts, self.instances)

    def add(self, category: str, boxes: List[Tuple[Tuple[float, float, float], Tuple[float, float, float]]],
            yaw: float = 0.0, hidden=(4,)) -> int:
        base = np.asarray(CATEGORY[category][2], dtype=np.float64)
        self.instances.append(Instance(len(self.instances) + 1, category,
                                       tuple(int(v) for v in np.clip(base + self.rng.normal(0, 10, 3), 0, 255))))
        k = len(self.instances) - 1
        if yaw != 0.0 and len(boxes) > 1:  # turn the whole object about its footprint centre
            lo = np.min([b[0] for b in boxes], 0)
            hi = np.max([b[1] for b in boxes], 0)
            ctr = (lo[:2] + hi[:2]) / 2
            c, s = np.cos(yaw), np.sin(yaw)
            rot = np.array([[c, -s], [s, c]])
            moved = []
            for blo, bhi in boxes:
                pc = (np.asarray(blo[:2]) + np.asarray(bhi[:2])) / 2
                half = (np.asarray(bhi[:2]) - np.asarray(blo[:2])) / 2
                wc = rot @ (pc - ctr) + ctr
                moved.append(((wc[0] - half[0], wc[1] - half[1], blo[2]), (wc[0] + half[0], wc[1] + half[1], bhi[2])))
            boxes = moved
        for lo, hi in boxes:
            self.parts.append(Part(lo, hi, k, hidden=hidden, yaw=yaw))
        return k

    def _build(self) -> None:
        u = self.rng.uniform
        x0, x1 = self.x0, self.x1
        self.add("road", [((x0, -4.0, -0.3), (x1, 4.0, 0.0))], hidden=(4,))
        x = x0 + u(0, 3)
        while x < x1 - 3:  # dashed centre line
            self.add("lane-marking", [((x, -0.08, -0.29), (x + 3.0, 0.08, 0.004))])
            x += 9.0
        for side in (-1, 1):
            y_in, y_out = 4.0, 7.0
            ys = sorted((side * y_in, side * y_out))
            self.add("sidewalk", [((x0, ys[0], -0.3), (x1, ys[1], 0.14))])
            # beyond the sidewalk: terrain strip, then buildings with gaps (hedges or fences in them)
            ts = sorted((side * 7.0, side * 9.0))
            self.add("terrain", [((x0, ts[0], -0.3), (x1, ts[1], 0.06))])
            yg = sorted((side * 9.0, side * 40.0))  # the ground behind, seen through the gaps
            self.add("terrain", [((x0, yg[0], -0.3), (x1, yg[1], 0.02))])
            x = x0
            while x < x1:
                length = u(8, 25)
                depth, height = u(8, 15), u(6, 18)
                yb = sorted((side * 9.5, side * (9.5 + depth)))
                self.add("building", [((x, yb[0], 0.0), (x + length, yb[1], height))])
                x += length
                gap = u(2, 7)
                if u() < 0.6:
                    yh = sorted((side * 9.6, side * 10.8))
                    self.add("vegetation", [((x + 0.3, yh[0], 0.0), (x + gap - 0.3, yh[1], u(0.8, 1.8)))])
                elif u() < 0.5:
                    yf = sorted((side * 8.8, side * 8.85))
                    self.add("fence", [((x, yf[0], 0.0), (x + gap, yf[1], u(1.0, 1.6)))])
                x += gap
            # trees and street furniture on the outer sidewalk edge
            x = x0 + u(0, 6)
            while x < x1:
                y = side * u(6.0, 6.5)
                z0 = 0.14
                if u() < 0.6:
                    th = u(2.0, 3.2)
                    self.add("trunk", [((x - 0.15, y - 0.15, z0), (x + 0.15, y + 0.15, z0 + th))])
                    r = u(1.2, 2.2)
                    top = z0 + th + u(1.8, 3.2)
                    self.add("vegetation", [((x - r, y - r, z0 + th), (x + r, y + r, top))], hidden=())
                elif u() < 0.6:
                    self.add("pole", [((x - 0.08, y - 0.08, z0), (x + 0.08, y + 0.08, z0 + u(5, 7)))])
                else:
                    self.add("pole", [((x - 0.05, y - 0.05, z0), (x + 0.05, y + 0.05, z0 + 2.6))])
                    self.add("traffic-sign", [((x - 0.3, y - 0.03, z0 + 2.0), (x + 0.3, y + 0.03, z0 + 2.6))],
                             hidden=())
                x += u(7, 14)
            # parked cars along the kerb, pedestrians and bicycles on the sidewalk
            x = x0 + u(0, 8)
            while x < x1 - 5:
                if u() < 0.55:
                    self.car(x, side * 3.0, u(-0.08, 0.08))
                x += u(5.5, 9.0)
            x = x0 + u(0, 10)
            while x < x1:
                y = side * u(4.6, 5.6)
                if u() < 0.7:
                    self.add("person", [((x - 0.2, y - 0.12, 0.14), (x + 0.2, y + 0.12, 0.14 + 0.85)),
                                        ((x - 0.25, y - 0.15, 0.99), (x + 0.25, y + 0.15, 0.14 + u(1.6, 1.85)))],
                             yaw=u(-np.pi, np.pi))
                else:
                    self.add("bicycle", [((x - 0.85, y - 0.05, 0.14), (x + 0.85, y + 0.05, 1.1))], yaw=u(-0.2, 0.2))
                x += u(8, 20)
            if u() < 0.7:
                xk = u(x0, x1 - 3)
                yk = sorted((side * 7.2, side * 8.8))
                self.add("other-structure", [((xk, yk[0], 0.06), (xk + 2.5, yk[1], 2.4))])
        # oncoming traffic in the left lane
        x = x0 + u(0, 20)
        while x < x1 - 5:
            if u() < 0.5:
                self.car(x, 1.9, np.pi + u(-0.05, 0.05))
            x += u(12, 30)

    def car(self, x: float, y: float, yaw: float) -> None:
        u = self.rng.uniform
        L, W = u(3.9, 4.7), u(1.7, 1.9)
        self.add("car", [((x, y - W / 2, 0.25), (x + L, y + W / 2, 0.95)),
                         ((x + 0.9, y - W / 2 + 0.1, 0.95), (x + L - 1.0, y + W / 2 - 0.1, u(1.35, 1.5))),
                         ((x + 0.5, y - W / 2, 0.0), (x + 0.9, y + W / 2, 0.25)),
                         ((x + L - 0.9, y - W / 2, 0.0), (x + L - 0.5, y + W / 2, 0.25))], yaw=yaw)


def sensor_poses(rng: np.random.Generator, count: int) -> List[np.ndarray]:
    """Velodyne-to-world poses: the right lane, about 0.9 m per scan, a slight weave."""
    poses = []
    x, yaw = 0.0, 0.0
    for _ in range(count):
        y = -1.9 + 0.15 * np.sin(x / 9.0)
        yaw = 0.15 * np.cos(x / 9.0) / 9.0
        T = synth.rigid(yaw, [x, y, SENSOR_HEIGHT])
        poses.append(T)
        x += float(rng.uniform(0.85, 0.95))
    return poses


def remission(street: Street, scan: Dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    inst = street.scene.part_instance[scan["part"]]
    base = np.array([CATEGORY[i.category][1] for i in street.instances])[inst]
    cos_inc = np.abs(np.sum(scan["normals"] * scan["dirs"], axis=1))
    r = base * (0.55 + 0.45 * cos_inc) * np.exp(-scan["range"] / 200.0) + rng.normal(0, 0.03, len(inst))
    return np.round(np.clip(r, 0.0, 0.99), 2)


def write_sequence(d: Path, count: int, rng: np.random.Generator, params: Dict[str, Any]) -> None:
    poses = sensor_poses(rng, count)
    travelled = poses[-1][0, 3] if poses else 0.0
    max_range = 60.0
    street = Street(rng, -max_range - 10.0, travelled + max_range + 10.0)
    raw_id = np.array([CATEGORY[i.category][0] for i in street.instances], dtype=np.uint32)
    inst_id = np.array([k + 1 if i.category in THINGS else 0 for k, i in enumerate(street.instances)], dtype=np.uint32)
    elevations = np.deg2rad(np.linspace(ELEVATION_RANGE[0], ELEVATION_RANGE[1], int(params["beams"])))
    (d / "velodyne").mkdir(parents=True, exist_ok=True)
    (d / "labels").mkdir(parents=True, exist_ok=True)
    for i, pose in enumerate(poses):
        scan = synth.lidar_scan(street.scene, pose, elevations, int(params["azimuth_steps"]), max_range=max_range,
                                min_range=2.0)
        noisy = scan["points"] * (1.0 + rng.normal(0, 0.01, len(scan["range"])) / scan["range"])[:, None]
        rem = remission(street, scan, rng)
        np.column_stack([noisy, rem]).astype("<f4").tofile(d / "velodyne" / f"{i:06d}.bin")
        inst = street.scene.part_instance[scan["part"]]
        ((inst_id[inst] << 16) | raw_id[inst]).astype("<u4").tofile(d / "labels" / f"{i:06d}.label")
    first_inv = np.linalg.inv(poses[0])
    tr_inv = np.linalg.inv(TR)
    cam = [TR @ first_inv @ T @ tr_inv for T in poses]
    (d / "poses.txt").write_text("".join(" ".join(f"{v:.6e}" for v in P[:3].ravel()) + "\n" for P in cam))
    (d / "times.txt").write_text("".join(f"{0.1036 * i:.6e}\n" for i in range(count)))
    calib = {"P0": P_CAM, "P1": P_CAM - [[0, 0, 0, 386.1448], [0, 0, 0, 0], [0, 0, 0, 0]],
             "P2": P_CAM + [[0, 0, 0, 45.38225], [0, 0, 0, -0.1130887], [0, 0, 0, 3.779761e-03]],
             "P3": P_CAM + [[0, 0, 0, -337.2877], [0, 0, 0, 2.369057], [0, 0, 0, 4.915215e-03]], "Tr": TR[:3]}
    (d / "calib.txt").write_text("".join(f"{k}: " + " ".join(f"{v:.12e}" for v in np.ravel(m)) + "\n"
                                         for k, m in calib.items()))
