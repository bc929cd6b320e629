"""Synthetic indoor scenes for tests and benchmarks: room-like surfaces, not uniform noise.

A scene is a floor, up to four walls (one left open, as in a partial scan), box furniture
(cabinets, beds, sofas), tables and chairs with legs and a little clutter, each piece turned
by its own yaw and the whole room by another and shifted off the voxel grid, sampled on its
surfaces (12k points/m^2) with 2 mm of noise. Voxelised at 2 cm, a site has about 12 occupied
sites in its 3x3x3 neighbourhood (centre included): surfaces not aligned with the grid cover
more than 9 voxels of a 3x3x3 block. Uniform noise would have about one.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

__all__ = ["room_points", "room_batch", "partial_scan"]

_Rect = Tuple[np.ndarray, np.ndarray, np.ndarray]  # origin, edge u, edge v (metres)


def _box_faces(centre, size, yaw, bottom=False) -> List[_Rect]:
    """The faces of an axis box of ``size`` turned by ``yaw`` about z around ``centre``."""
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    sx, sy, sz = size
    lo = -np.asarray(size, dtype=float) / 2
    ex, ey, ez = np.array([sx, 0, 0.0]), np.array([0, sy, 0.0]), np.array([0, 0, sz])
    faces = [
        (lo + ez, ex, ey),  # top
        (lo, ex, ez), (lo + ey, ex, ez),  # front / back
        (lo, ey, ez), (lo + ex, ey, ez),  # sides
    ]
    if bottom:
        faces.append((lo, ex, ey))
    centre = np.asarray(centre, dtype=float)
    return [(rot @ o + centre, rot @ u, rot @ v) for o, u, v in faces]


def _furniture(rng: np.random.Generator, lx: float, ly: float) -> List[_Rect]:
    rects: List[_Rect] = []
    n_items = int(rng.integers(4, 9))
    for _ in range(n_items):
        kind = rng.choice(["cabinet", "bed", "sofa", "table", "chair", "clutter"])
        yaw = rng.uniform(0, np.pi) if rng.random() < 0.6 else rng.choice([0.0, np.pi / 2])
        x, y = rng.uniform(0.6, lx - 0.6), rng.uniform(0.6, ly - 0.6)
        if kind == "cabinet":
            size = (rng.uniform(0.4, 1.2), rng.uniform(0.4, 0.6), rng.uniform(0.8, 2.0))
            rects += _box_faces((x, y, size[2] / 2), size, yaw)
        elif kind == "bed":
            size = (rng.uniform(1.4, 2.0), rng.uniform(0.9, 1.6), rng.uniform(0.4, 0.6))
            rects += _box_faces((x, y, size[2] / 2), size, yaw)
        elif kind == "sofa":
            w, d = rng.uniform(1.4, 2.2), rng.uniform(0.8, 1.0)
            rects += _box_faces((x, y, 0.22), (w, d, 0.44), yaw)
            back = np.array([0.0, d / 2 - 0.1, 0.0])
            c, s = np.cos(yaw), np.sin(yaw)
            off = np.array([c * back[0] - s * back[1], s * back[0] + c * back[1], 0.0])
            rects += _box_faces((x + off[0], y + off[1], 0.6), (w, 0.2, 0.4), yaw)
        elif kind in ("table", "chair"):
            w, d, h = (rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0), 0.75) if kind == "table" else (0.45, 0.45, 0.45)
            rects += _box_faces((x, y, h), (w, d, 0.04), yaw, bottom=True)
            c, s = np.cos(yaw), np.sin(yaw)
            for sx in (-1, 1):
                for sy in (-1, 1):
                    lx_, ly_ = sx * (w / 2 - 0.05), sy * (d / 2 - 0.05)
                    px, py = x + c * lx_ - s * ly_, y + s * lx_ + c * ly_
                    rects += _box_faces((px, py, h / 2), (0.05, 0.05, h), yaw)
            if kind == "chair":
                ox, oy = -s * (d / 2), c * (d / 2)
                rects += _box_faces((x + ox, y + oy, h + 0.25), (w, 0.04, 0.5), yaw)
        else:
            for _ in range(int(rng.integers(2, 6))):
                size = tuple(rng.uniform(0.08, 0.35, size=3))
                cx, cy = x + rng.uniform(-0.4, 0.4), y + rng.uniform(-0.4, 0.4)
                rects += _box_faces((cx, cy, size[2] / 2), size, rng.uniform(0, np.pi))
    return rects


def room_points(rng: np.random.Generator, scale: float = 1.0, density: float = 12000.0,
                noise: float = 0.002) -> np.ndarray:
    """Points (N, 3) float32 in metres on the surfaces of one random room.

    ``scale`` multiplies the room's floor dimensions; ``density`` is points per square metre.
    """
    lx, ly = rng.uniform(4.0, 7.0) * scale, rng.uniform(3.5, 6.0) * scale
    h = rng.uniform(2.4, 3.0)
    ex, ey, ez = np.array([lx, 0, 0.0]), np.array([0, ly, 0.0]), np.array([0, 0, h])
    o = np.zeros(3)
    rects: List[_Rect] = [(o, ex, ey)]
    walls = [(o, ex, ez), (o + ey, ex, ez), (o, ey, ez), (o + ex, ey, ez)]
    open_wall = int(rng.integers(0, 4))
    rects += [w for i, w in enumerate(walls) if i != open_wall]
    n_blocks = max(1, int(round(scale * scale)))
    for _ in range(n_blocks):
        rects += _furniture(rng, lx, ly)
    chunks = []
    for origin, u, v in rects:
        area = float(np.linalg.norm(np.cross(u, v)))
        n = rng.poisson(area * density)
        if n == 0:
            continue
        a, b = rng.random((n, 1)), rng.random((n, 1))
        chunks.append(origin + a * u + b * v)
    pts = np.concatenate(chunks, axis=0)
    pts = pts[(pts[:, 0] >= -0.01) & (pts[:, 0] <= lx + 0.01) & (pts[:, 1] >= -0.01) & (pts[:, 1] <= ly + 0.01)]
    pts = pts + rng.normal(0.0, noise, size=pts.shape)
    yaw = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    # Scans are not aligned with the voxel grid: turn and shift the room at random.
    return (pts @ rot.T + rng.uniform(-1.0, 1.0, size=3)).astype(np.float32)


def partial_scan(vox: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``vox`` (M, 3) to keep so that at most ``need`` remain: all of them, or the
    ``need`` rows on one side of a random vertical plane (a contiguous piece, as a partial scan
    would be), in their original order."""
    if len(vox) <= need:
        return np.arange(len(vox))
    ang = rng.uniform(0, 2 * np.pi)
    proj = vox[:, 0] * np.cos(ang) + vox[:, 1] * np.sin(ang)
    return np.sort(np.argsort(proj, kind="stable")[:need])


def room_batch(n_voxels: int, voxel_size: float = 0.02, seed: int = 0, max_rooms: int = 8,
               rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
    """About ``n_voxels`` voxels of room surfaces as a batch.

    Returns ``coords (M, 4) int32`` (batch index, x, y, z in voxel units, unique) and ``colors
    (M, 3) float32`` in [-0.5, 0.5]. Rooms are added until the target is reached (at most
    ``max_rooms``, scaled up when fewer would not suffice); the last room is cut by a vertical
    plane, as a partial scan would be, so that M is within 1% of ``n_voxels``.
    """
    rng = rng if rng is not None else np.random.default_rng(seed)
    # A 2 cm room of scale 1 has roughly 200k surface voxels; grow rooms rather than the batch.
    per_room = 200000.0 * (0.02 / voxel_size) ** 2
    n_rooms = int(min(max_rooms, max(1, round(n_voxels / (2 * per_room)))))
    scale = float(np.sqrt(max(1.0, n_voxels / (n_rooms * per_room))))
    coords_list, total, b = [], 0, 0
    while total < n_voxels:
        pts = room_points(rng, scale=scale)
        vox = np.unique(np.floor(pts / voxel_size).astype(np.int32), axis=0)
        rng.shuffle(vox)  # scanners do not emit voxels in lexicographic order
        vox = vox[partial_scan(vox, n_voxels - total, rng)]
        coords_list.append(np.concatenate([np.full((len(vox), 1), b, np.int32), vox], axis=1))
        total += len(vox)
        b += 1
    coords = np.concatenate(coords_list, axis=0)
    colors = rng.uniform(-0.5, 0.5, size=(len(coords), 3)).astype(np.float32)
    return coords, colors
