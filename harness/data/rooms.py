"""Random indoor rooms of box furniture, for the embedded ScanNet- and S3DIS-format miniatures.

A room is floor + four walls (optionally ceiling, beams, columns) with furniture of about
fifteen categories, each with its own shape (a union of boxes) and colour distribution, placed
without overlaps against walls or free in the room. Categories are generic names; each dataset
writer maps them to its own label set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from harness.data.synth import BoxScene, Instance, Part

# Albedo choices per category (RGB); each instance picks one and jitters it.
PALETTE: Dict[str, List[Tuple[int, int, int]]] = {
    "wall": [(226, 221, 206), (205, 214, 222), (232, 226, 190)],
    "floor": [(143, 104, 68), (121, 121, 126), (170, 140, 105)],
    "ceiling": [(240, 240, 238)],
    "beam": [(215, 212, 205)],
    "column": [(200, 198, 190)],
    "chair": [(150, 40, 40), (40, 60, 140), (35, 35, 35), (200, 140, 60)],
    "table": [(160, 120, 80), (95, 62, 40), (230, 230, 225)],
    "desk": [(200, 190, 170), (110, 80, 50)],
    "bed": [(120, 80, 50), (90, 90, 100)],
    "sofa": [(80, 90, 110), (140, 60, 50), (60, 60, 60), (110, 130, 90)],
    "cabinet": [(182, 150, 110), (220, 220, 212), (100, 100, 105)],
    "bookshelf": [(100, 70, 45), (190, 170, 140)],
    "refrigerator": [(236, 236, 236), (180, 182, 186)],
    "toilet": [(246, 246, 246)],
    "bathtub": [(240, 240, 232)],
    "counter": [(75, 75, 80), (170, 150, 120)],
    "sink": [(212, 212, 218)],
    "door": [(130, 90, 60), (240, 240, 232), (160, 110, 70)],
    "window": [(170, 200, 230)],
    "picture": [(200, 60, 60), (60, 150, 80), (220, 190, 60), (70, 90, 170)],
    "board": [(245, 245, 245)],
    "curtain": [(170, 60, 60), (60, 100, 150), (200, 190, 150)],
    "box": [(181, 149, 101)],
}

ROOM_TYPES: Dict[str, List[Tuple[str, float]]] = {
    # (category, probability of each of up to N copies)
    "bedroom": [("bed", 1.0), ("cabinet", 0.8), ("desk", 0.6), ("bookshelf", 0.5), ("box", 0.5), ("chair", 0.5)],
    "living": [("sofa", 1.0), ("table", 1.0), ("bookshelf", 0.6), ("cabinet", 0.5), ("box", 0.4), ("sofa", 0.3)],
    "bathroom": [("toilet", 1.0), ("bathtub", 0.9), ("sink", 1.0), ("cabinet", 0.6), ("box", 0.3)],
    "kitchen": [("counter", 1.0), ("refrigerator", 0.9), ("table", 0.8), ("cabinet", 0.7), ("sink", 0.6)],
    "office": [("desk", 1.0), ("desk", 0.7), ("bookshelf", 0.8), ("cabinet", 0.6), ("table", 0.4), ("box", 0.5)],
}


@dataclass
class Room:
    scene: BoxScene
    size: Tuple[float, float, float]  # W, D, H of the interior
    kind: str


def _jitter(rng: np.random.Generator, color: Tuple[int, int, int], amount: float = 14.0) -> Tuple[int, int, int]:
    c = np.clip(np.asarray(color, dtype=np.float64) + rng.normal(0, amount, 3), 0, 255)
    return tuple(int(v) for v in c)


# -- furniture shapes: parts in a local frame [0,w] x [0,d] x [0,h]; the back is at y = d -------
Shape = List[Tuple[Tuple[float, float, float], Tuple[float, float, float], Optional[Tuple[int, int, int]]]]


def _legs(w: float, d: float, h: float, t: float = 0.05) -> Shape:
    return [((x, y, 0.0), (x + t, y + t, h), None) for x in (0.0, w - t) for y in (0.0, d - t)]


def shape_of(category: str, rng: np.random.Generator) -> Tuple[Shape, Tuple[float, float]]:
    """Parts (lo, hi, colour override) and the footprint (w, d) of one object."""
    u = rng.uniform
    if category == "chair":
        w = d = u(0.42, 0.52)
        seat = u(0.42, 0.48)
        parts = _legs(w, d, seat - 0.05, 0.04) + [((0, 0, seat - 0.05), (w, d, seat), None),
                                                  ((0, d - 0.06, seat), (w, d, seat + u(0.35, 0.5)), None)]
    elif category == "table":
        w, d, h = u(1.0, 1.6), u(0.7, 1.0), u(0.72, 0.78)
        parts = _legs(w, d, h - 0.05, 0.06) + [((0, 0, h - 0.05), (w, d, h), None)]
    elif category == "desk":
        w, d, h = u(1.1, 1.5), u(0.55, 0.7), u(0.72, 0.76)
        parts = [((0, 0, 0), (0.04, d, h - 0.04), None), ((w - 0.45, 0, 0), (w, d, h - 0.04), None),
                 ((0, 0, h - 0.04), (w, d, h), None), ((0.04, d - 0.03, 0.3), (w - 0.45, d, h - 0.04), None)]
    elif category == "bed":
        w, d = u(1.4, 1.8), u(1.9, 2.1)
        frame = (0, 0, 0), (w, d, 0.3)
        white = (232, 232, 238)
        parts = [(frame[0], frame[1], None), ((0.02, 0.02, 0.3), (w - 0.02, d - 0.12, 0.5), white),
                 ((0, d - 0.1, 0), (w, d, 0.95), None), ((0.15, d - 0.55, 0.5), (w - 0.15, d - 0.15, 0.62), white)]
    elif category == "sofa":
        w, d = u(1.6, 2.2), u(0.8, 0.95)
        parts = [((0.2, 0, 0), (w - 0.2, d, 0.42), None), ((0, d - 0.22, 0), (w, d, 0.85), None),
                 ((0, 0, 0), (0.2, d - 0.22, 0.62), None), ((w - 0.2, 0, 0), (w, d - 0.22, 0.62), None)]
    elif category == "cabinet":
        w, d, h = u(0.6, 1.0), u(0.4, 0.55), u(0.8, 1.2)
        handle = (60, 60, 60)
        parts = [((0, 0, 0), (w, d, h), None), ((w / 2 - 0.1, -0.02, h * 0.7), (w / 2 + 0.1, 0, h * 0.75), handle)]
    elif category == "bookshelf":
        w, d, h = u(0.8, 1.1), u(0.3, 0.38), u(1.6, 2.0)
        parts = [((0, 0, 0), (0.03, d, h), None), ((w - 0.03, 0, 0), (w, d, h), None),
                 ((0, d - 0.02, 0), (w, d, h), None)]
        shelves = 5
        for k in range(shelves):
            z = k * (h - 0.03) / (shelves - 1)
            parts.append(((0.03, 0, z), (w - 0.03, d - 0.02, z + 0.03), None))
            if k < shelves - 1:
                x = 0.05
                while x < w - 0.12:
                    bw = u(0.08, 0.25)  # a block of books
                    bh = u(0.15, 0.3) if k < shelves - 1 else 0.1
                    col = tuple(int(c) for c in rng.integers(30, 230, 3))
                    parts.append(((x, 0.05, z + 0.03), (x + bw, d - 0.03, z + 0.03 + bh), col))
                    x += bw + u(0.0, 0.04)
    elif category == "refrigerator":
        w, d, h = u(0.6, 0.8), u(0.6, 0.75), u(1.7, 1.9)
        parts = [((0, 0, 0), (w, d, h), None), ((w - 0.08, -0.04, h * 0.4), (w - 0.05, 0, h * 0.8), (90, 90, 90))]
    elif category == "toilet":
        w, d = u(0.38, 0.45), u(0.62, 0.72)
        parts = [((0.05, 0, 0), (w - 0.05, d - 0.2, 0.4), None), ((0, d - 0.2, 0), (w, d, 0.8), None)]
    elif category == "bathtub":
        w, d, h, t = u(1.5, 1.75), u(0.7, 0.8), u(0.5, 0.6), 0.08
        parts = [((0, 0, 0), (w, d, 0.1), None), ((0, 0, 0), (t, d, h), None), ((w - t, 0, 0), (w, d, h), None),
                 ((t, 0, 0), (w - t, t, h), None), ((t, d - t, 0), (w - t, d, h), None)]
    elif category == "counter":
        w, d, h = u(1.6, 2.4), u(0.55, 0.65), u(0.88, 0.92)
        body = PALETTE["cabinet"][1]
        parts = [((0, 0.03, 0), (w, d, h - 0.04), body), ((0, 0, h - 0.04), (w, d, h), None)]
    elif category == "sink":
        w, d = u(0.45, 0.6), u(0.4, 0.5)
        parts = [((w / 2 - 0.08, d - 0.2, 0), (w / 2 + 0.08, d - 0.05, 0.7), None),
                 ((0, 0, 0.7), (w, d, 0.76), None), ((0, 0, 0.76), (w, 0.05, 0.88), None),
                 ((0, d - 0.05, 0.76), (w, d, 0.88), None), ((0, 0.05, 0.76), (0.05, d - 0.05, 0.88), None),
                 ((w - 0.05, 0.05, 0.76), (w, d - 0.05, 0.88), None)]
    elif category == "box":
        w, d, h = u(0.25, 0.45), u(0.25, 0.45), u(0.2, 0.45)
        parts = [((0, 0, 0), (w, d, h), None)]
    else:
        raise KeyError(f"rooms: no shape for category {category!r}")
    return parts, (w, d)


def _rotate(parts: Shape, fp: Tuple[float, float], k: int) -> Tuple[Shape, Tuple[float, float]]:
    """Rotate local parts by k x 90 degrees about +z, keeping them in the positive quadrant."""
    w, d = fp
    out: Shape = []
    for lo, hi, col in parts:
        corners = np.array([[x, y] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])])
        for _ in range(k % 4):
            corners = np.stack([-corners[:, 1], corners[:, 0]], -1)
        out.append(((corners[:, 0].min(), corners[:, 1].min(), lo[2]), (corners[:, 0].max(), corners[:, 1].max(), hi[2]), col))
    shift = np.min([[p[0][0], p[0][1]] for p in out], axis=0)
    out = [((lo[0] - shift[0], lo[1] - shift[1], lo[2]), (hi[0] - shift[0], hi[1] - shift[1], hi[2]), col)
           for lo, hi, col in out]
    return out, ((w, d) if k % 2 == 0 else (d, w))


AGAINST_WALL = {"bed", "sofa", "cabinet", "bookshelf", "refrigerator", "toilet", "bathtub", "counter", "sink", "desk"}


def make_room(rng: np.random.Generator, kind: Optional[str] = None, ceiling: bool = False,
              beams: bool = False, columns: bool = False, size_range: Tuple[float, float] = (3.2, 4.6),
              height: float = 2.4, wall_items: Sequence[str] = ("door", "window", "picture", "curtain")) -> Room:
    kind = kind or str(rng.choice(sorted(ROOM_TYPES)))
    W, D = (float(v) for v in rng.uniform(*size_range, 2))
    H = height
    instances: List[Instance] = []
    parts: List[Part] = []

    def new_instance(category: str) -> int:
        instances.append(Instance(len(instances) + 1, category, _jitter(rng, PALETTE[category][rng.integers(len(PALETTE[category]))])))
        return len(instances) - 1

    t = 0.1
    fi = new_instance("floor")
    parts.append(Part((-t, -t, -t), (W + t, D + t, 0.0), fi, hidden=(0, 1, 2, 3, 4)))
    # walls: -x, +x, -y, +y; only the inner face is visible
    for lo, hi, inner in [((-t, -t, 0), (0.0, D + t, H), 1), ((W, -t, 0), (W + t, D + t, H), 0),
                          ((0, -t, 0), (W, 0.0, H), 3), ((0, D, 0), (W, D + t, H), 2)]:
        wi = new_instance("wall")
        parts.append(Part(lo, hi, wi, hidden=tuple(f for f in range(6) if f != inner)))
    if ceiling:
        ci = new_instance("ceiling")
        parts.append(Part((-t, -t, H), (W + t, D + t, H + t), ci, hidden=(0, 1, 2, 3, 5)))
    if beams:
        for _ in range(int(rng.integers(1, 3))):
            bi = new_instance("beam")
            y = rng.uniform(0.5, D - 0.8)
            parts.append(Part((0.0, y, H - 0.3), (W, y + 0.3, H), bi, hidden=(0, 1, 5)))
    if columns:
        for cx, cy in [(0.0, 0.0), (W - 0.35, D - 0.35)][: int(rng.integers(1, 3))]:
            ci = new_instance("column")
            parts.append(Part((cx, cy, 0.0), (cx + 0.35, cy + 0.35, H), ci, hidden=(4, 5)))

    occupied: List[Tuple[float, float, float, float]] = []  # x0, y0, x1, y1 footprints

    def free(x0: float, y0: float, x1: float, y1: float, margin: float = 0.08) -> bool:
        if x0 < 0.02 or y0 < 0.02 or x1 > W - 0.02 or y1 > D - 0.02:
            return False
        return all(x1 + margin <= a or b + margin <= x0 or y1 + margin <= c or e + margin <= y0
                   for a, c, b, e in occupied)

    def place(category: str, at: Optional[Tuple[float, float, int]] = None) -> Optional[Tuple[float, float, float, float]]:
        shape, fp = shape_of(category, rng)
        for _ in range(60):
            if at is not None:
                x, y, k = at
            elif category in AGAINST_WALL:
                wall = int(rng.integers(4))
                k = {0: 2, 1: 0, 2: 3, 3: 1}[wall]  # back towards the wall
                rot_fp = fp if k % 2 == 0 else (fp[1], fp[0])
                if wall == 0:
                    x, y = 0.03, rng.uniform(0.03, D - rot_fp[1] - 0.03)
                elif wall == 1:
                    x, y = W - rot_fp[0] - 0.03, rng.uniform(0.03, D - rot_fp[1] - 0.03)
                elif wall == 2:
                    x, y = rng.uniform(0.03, W - rot_fp[0] - 0.03), 0.03
                else:
                    x, y = rng.uniform(0.03, W - rot_fp[0] - 0.03), D - rot_fp[1] - 0.03
            else:
                k = int(rng.integers(4))
                rot_fp = fp if k % 2 == 0 else (fp[1], fp[0])
                x, y = rng.uniform(0.1, W - rot_fp[0] - 0.1), rng.uniform(0.1, D - rot_fp[1] - 0.1)
            rparts, rfp = _rotate(shape, fp, k)
            box = (x, y, x + rfp[0], y + rfp[1])
            if free(*box):
                occupied.append(box)
                ii = new_instance(category)
                for lo, hi, col in rparts:
                    on_floor = lo[2] <= 1e-9
                    parts.append(Part((lo[0] + x, lo[1] + y, lo[2]), (hi[0] + x, hi[1] + y, hi[2]), ii,
                                      hidden=(4,) if on_floor else (), color=_jitter(rng, col, 8) if col else None))
                return box
            if at is not None:
                return None
        return None

    # Doors first (keep the space in front of them free).
    for item in wall_items:
        if item == "door" or rng.uniform() < 0.7:
            _wall_item(rng, item, W, D, H, parts, new_instance, occupied)

    for category, p in ROOM_TYPES[kind]:
        if rng.uniform() < p:
            box = place(category)
            if box is not None and category == "table":
                # chairs around the table, facing it
                x0, y0, x1, y1 = box
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                for side, k in [(0, 0), (1, 2), (2, 1), (3, 3)]:
                    if rng.uniform() < 0.7:
                        off = 0.1
                        pos = {0: (cx - 0.23, y0 - 0.5 - off), 1: (cx - 0.23, y1 + off),
                               2: (x1 + off, cy - 0.23), 3: (x0 - 0.5 - off, cy - 0.23)}[side]
                        # chair back faces away from the table
                        kk = {0: 2, 1: 0, 2: 1, 3: 3}[side]
                        place("chair", at=(pos[0], pos[1], kk))
            if box is not None and category == "desk":
                x0, y0, x1, y1 = box
                place("chair", at=((x0 + x1) / 2 - 0.23, (y0 + y1) / 2 - 0.23, int(rng.integers(4))))
    return Room(BoxScene.build(parts, instances), (W, D, H), kind)


def _wall_item(rng: np.random.Generator, item: str, W: float, D: float, H: float, parts: List[Part],
               new_instance: Callable[[str], int], occupied: List[Tuple[float, float, float, float]]) -> None:
    wall = int(rng.integers(4))
    length = D if wall < 2 else W
    size = {"door": (0.9, 2.05, 0.0), "window": (rng.uniform(0.8, 1.4), rng.uniform(0.9, 1.2), 0.9),
            "picture": (rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.6), 1.3), "curtain": (0.5, min(2.1, H - 0.1), 0.05)}
    w, h, z0 = size[item]
    if length < w + 0.3:
        return
    a = float(rng.uniform(0.15, length - w - 0.15))
    depth = {"door": 0.05, "window": 0.04, "picture": 0.02, "curtain": 0.06}[item]
    ii = new_instance(item)
    if wall == 0:
        lo, hi, hide = (0.0, a, z0), (depth, a + w, z0 + h), 0
    elif wall == 1:
        lo, hi, hide = (W - depth, a, z0), (W, a + w, z0 + h), 1
    elif wall == 2:
        lo, hi, hide = (a, 0.0, z0), (a + w, depth, z0 + h), 2
    else:
        lo, hi, hide = (a, D - depth, z0), (a + w, D, z0 + h), 3
    parts.append(Part(lo, hi, ii, hidden=(hide, 4) if z0 == 0 else (hide,)))
    if item == "door":  # keep 0.8 m in front of the door free
        clear = 0.8
        fx = {0: (0.0, a, clear, a + w), 1: (W - clear, a, W, a + w), 2: (a, 0.0, a + w, clear), 3: (a, D - clear, a + w, D)}
        occupied.append(fx[wall])
