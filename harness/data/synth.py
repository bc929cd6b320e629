"""Geometry for the embedded miniature datasets: scenes of boxes, meshes, ray-cast RGB-D frames.

A synthetic scene is a list of axis-aligned boxes (parts), each belonging to an object instance
with a category and a colour. From it we write meshes (vertices on the visible faces), render
depth and colour frames by exact ray casting (a depth test for free), and sample lidar scans.
One colour function (albedo x face shading x a 3D texture) serves the mesh vertices and the
rendered pixels, so a point and the pixel it projects to agree, as in a real reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

LIGHT = np.array([0.3, -0.5, 0.81], dtype=np.float64)
LIGHT = LIGHT / np.linalg.norm(LIGHT)
FACE_NORMALS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=np.float64)


@dataclass
class Instance:
    """An object made of box parts."""

    id: int
    category: str
    color: Tuple[int, int, int]


@dataclass
class Part:
    lo: Sequence[float]
    hi: Sequence[float]
    instance: int  # index into the scene's instances
    hidden: Sequence[int] = ()  # faces left out of the mesh, order -x,+x,-y,+y,-z,+z
    color: Optional[Sequence[float]] = None  # None = the instance's colour
    yaw: float = 0.0  # the box [lo, hi] turned by yaw (radians, counter-clockwise about +z) about its centre


@dataclass
class BoxScene:
    lo: np.ndarray  # (P, 3) part minimum corners
    hi: np.ndarray  # (P, 3) part maximum corners
    part_instance: np.ndarray  # (P,) index into instances
    instances: List[Instance]
    hidden: np.ndarray  # (P, 6) bool
    colors: np.ndarray  # (P, 3) float albedo per part
    yaw: Optional[np.ndarray] = None  # (P,) turn of each part about its centre; None = all axis-aligned

    @staticmethod
    def build(parts: Sequence[Part], instances: List[Instance]) -> "BoxScene":
        lo = np.array([p.lo for p in parts], dtype=np.float64)
        hi = np.array([p.hi for p in parts], dtype=np.float64)
        if np.any(hi <= lo):
            raise ValueError("synth: a part has a non-positive extent")
        inst = np.array([p.instance for p in parts], dtype=np.int64)
        hidden = np.zeros((len(parts), 6), dtype=bool)
        for i, p in enumerate(parts):
            hidden[i, list(p.hidden)] = True
        colors = np.array([p.color if p.color is not None else instances[p.instance].color for p in parts],
                          dtype=np.float64)
        yaw = np.array([p.yaw for p in parts], dtype=np.float64)
        return BoxScene(lo, hi, inst, instances, hidden, colors, yaw if np.any(yaw != 0.0) else None)


def rows_times(v: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``v @ M.T`` for (N, 3) rows without BLAS (whose threads crawl on a busy machine)."""
    return np.einsum("ij,kj->ik", v, M)


def texture(points: np.ndarray, cell: float = 0.04, amount: float = 0.12) -> np.ndarray:
    """A deterministic 3D brightness texture in [1 - amount, 1 + amount] (hash of the cell)."""
    ijk = np.floor(points / cell).astype(np.int64)
    h = (ijk[:, 0] * 73856093) ^ (ijk[:, 1] * 19349663) ^ (ijk[:, 2] * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    u = ((h >> 8) & 0xFFFF).astype(np.float64) / 65535.0
    return 1.0 + amount * (2.0 * u - 1.0)


def shade(albedo: np.ndarray, normals: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Colour of surface points: albedo x (ambient + diffuse) x texture, as uint8."""
    diffuse = np.abs(np.einsum("ij,j->i", normals, LIGHT))
    c = albedo * (0.7 + 0.3 * diffuse)[:, None] * texture(points)[:, None]
    return np.clip(np.rint(c), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Meshes


def _visible_faces(scene: BoxScene) -> Iterator[Tuple[int, int, np.ndarray, np.ndarray, int, int, int, int]]:
    """(part, face, lo, hi, axis, side, u axis, v axis) of every face not marked hidden, in order."""
    for p in range(len(scene.lo)):
        lo, hi = scene.lo[p], scene.hi[p]
        for f in range(6):
            if scene.hidden[p, f]:
                continue
            axis, side = divmod(f, 2)
            u_ax, v_ax = [a for a in range(3) if a != axis]
            yield p, f, lo, hi, axis, side, u_ax, v_ax


def _placed(scene: BoxScene, p: int, v: np.ndarray, normal: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Points and normal of part ``p``'s axis-aligned box turned by its yaw about the box centre."""
    if scene.yaw is None or scene.yaw[p] == 0.0:
        return v, normal
    rot = _yaw_matrix(scene.yaw[p])
    centre = (scene.lo[p] + scene.hi[p]) / 2.0
    return rows_times(v - centre, rot) + centre, rot @ normal


def box_mesh(scene: BoxScene, spacing: float) -> Dict[str, np.ndarray]:
    """Grid-triangulated visible faces: vertices, faces, colours, part id and face id per vertex."""
    verts, faces, part_ids, face_ids, normals = [], [], [], [], []
    base = 0
    for p, f, lo, hi, axis, side, u_ax, v_ax in _visible_faces(scene):
        nu = max(1, int(np.ceil((hi[u_ax] - lo[u_ax]) / spacing)))
        nv = max(1, int(np.ceil((hi[v_ax] - lo[v_ax]) / spacing)))
        us = np.linspace(lo[u_ax], hi[u_ax], nu + 1)
        vs = np.linspace(lo[v_ax], hi[v_ax], nv + 1)
        uu, vv = np.meshgrid(us, vs, indexing="ij")
        v = np.empty((uu.size, 3))
        v[:, axis] = hi[axis] if side else lo[axis]
        v[:, u_ax] = uu.ravel()
        v[:, v_ax] = vv.ravel()
        i = np.arange(nu)[:, None] * (nv + 1) + np.arange(nv)[None, :]
        a, b, c, d = i, i + (nv + 1), i + (nv + 1) + 1, i + 1
        tri = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
        if side == 0:  # outward winding
            tri = tri[:, ::-1]
        normal = FACE_NORMALS[f]
        v, normal = _placed(scene, p, v, normal)
        verts.append(v)
        faces.append(tri + base)
        part_ids.append(np.full(len(v), p))
        face_ids.append(np.full(len(v), f))
        normals.append(np.repeat(normal[None], len(v), 0))
        base += len(v)
    verts_a = np.concatenate(verts)
    parts = np.concatenate(part_ids)
    normals_a = np.concatenate(normals)
    colors = shade(scene.colors[parts], normals_a, verts_a)
    return {
        "vertices": verts_a.astype(np.float32),
        "faces": np.concatenate(faces).astype(np.int32),
        "colors": colors,
        "part": parts,
        "face": np.concatenate(face_ids),
        "normals": normals_a.astype(np.float32),
    }


def sample_surface(scene: BoxScene, density: float, rng: np.random.Generator, noise: float = 0.0
                   ) -> Dict[str, np.ndarray]:
    """Random points on the visible faces (Poisson count, ``density`` per square metre, uniform).

    Returns points (float64), colours (uint8, the same shading as meshes and renders), part and
    face index and normal per point; ``noise`` adds Gaussian jitter (metres) along the normal,
    as a scanner's range noise.
    """
    pts, part_ids, face_ids, normals = [], [], [], []
    for p, f, lo, hi, axis, side, u_ax, v_ax in _visible_faces(scene):
        area = (hi[u_ax] - lo[u_ax]) * (hi[v_ax] - lo[v_ax])
        n = int(rng.poisson(area * density))
        if n == 0:
            continue
        v = np.empty((n, 3))
        v[:, axis] = hi[axis] if side else lo[axis]
        v[:, u_ax] = rng.uniform(lo[u_ax], hi[u_ax], n)
        v[:, v_ax] = rng.uniform(lo[v_ax], hi[v_ax], n)
        normal = FACE_NORMALS[f]
        if noise > 0:
            v += rng.normal(0.0, noise, (n, 1)) * normal
        v, normal = _placed(scene, p, v, normal)
        pts.append(v)
        part_ids.append(np.full(n, p))
        face_ids.append(np.full(n, f))
        normals.append(np.repeat(normal[None], n, 0))
    if not pts:
        z = np.zeros((0, 3))
        return {"points": z, "colors": np.zeros((0, 3), np.uint8), "part": np.zeros(0, np.int64),
                "face": np.zeros(0, np.int64), "normals": z}
    points = np.concatenate(pts)
    parts = np.concatenate(part_ids)
    normals_a = np.concatenate(normals)
    return {"points": points, "colors": shade(scene.colors[parts], normals_a, points), "part": parts,
            "face": np.concatenate(face_ids), "normals": normals_a}


# ----------------------------------------------------------------------------------------------
# Ray casting


def _slab_axes(lo: np.ndarray, hi: np.ndarray, o: Sequence[np.ndarray], inv: Sequence[np.ndarray]
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Entry distance (inf where missed or starting inside) and entry axis of rays vs one box.

    ``o`` and ``inv`` are per-axis ray origins (arrays, or scalars when all rays share one origin)
    and inverse directions. Per-axis 1-D arithmetic: the same numbers as an (R, 3) slab test,
    several times faster (no reductions over a length-3 axis).
    """
    tx1 = (lo[0] - o[0]) * inv[0]
    tx2 = (hi[0] - o[0]) * inv[0]
    ty1 = (lo[1] - o[1]) * inv[1]
    ty2 = (hi[1] - o[1]) * inv[1]
    tz1 = (lo[2] - o[2]) * inv[2]
    tz2 = (hi[2] - o[2]) * inv[2]
    # fmin/fmax drop the NaN of 0 * inf (ray in the slab's plane)
    xmin, ymin, zmin = np.fmin(tx1, tx2), np.fmin(ty1, ty2), np.fmin(tz1, tz2)
    tmax = np.minimum(np.minimum(np.fmax(tx1, tx2), np.fmax(ty1, ty2)), np.fmax(tz1, tz2))
    # entry axis = first argmax of (xmin, ymin, zmin)
    axis = (ymin > xmin).astype(np.int64)
    tmin = np.maximum(xmin, ymin)
    axis[zmin > tmin] = 2
    tmin = np.maximum(tmin, zmin)
    hit = (tmax >= tmin) & (tmin > 1e-6)
    return np.where(hit, tmin, np.inf), axis


def _slab(lo: np.ndarray, hi: np.ndarray, o: np.ndarray, inv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Entry distance (inf where missed or starting inside) and entry axis of rays vs one box."""
    return _slab_axes(lo, hi, (o[:, 0], o[:, 1], o[:, 2]), (inv[:, 0], inv[:, 1], inv[:, 2]))


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def raycast(scene: BoxScene, origins: np.ndarray, dirs: np.ndarray,
            candidates: Optional[List[np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First hit of each ray: distance t (inf if none), part index (-1), face normal (R,3).

    ``origins`` is (R, 3), or (3,) when every ray starts at the same point (a camera, a lidar).

    ``candidates[p]``, when given, lists the only rays that can hit part p (screen-space culling);
    rays starting inside a part (e.g. a camera inside a wall) ignore that part. A part with a
    non-zero ``yaw`` is intersected in its own frame (the rays turned by -yaw about its centre).
    """
    dirs = np.asarray(dirs, dtype=np.float64)
    origins = np.asarray(origins, dtype=np.float64)
    R = len(dirs)
    if origins.ndim == 1:  # one origin shared by every ray
        shared, origins = True, np.broadcast_to(origins, (R, 3))
    else:
        shared = R > 0 and bool(np.all(origins == origins[0]))
    t_best = np.full(R, np.inf)
    part_best = np.full(R, -1, dtype=np.int64)
    axis_best = np.zeros(R, dtype=np.int64)
    yaw = scene.yaw if scene.yaw is not None else np.zeros(len(scene.lo))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_all = 1.0 / dirs
        inv_cols = [np.ascontiguousarray(inv_all[:, a]) for a in range(3)]
        o_cols = [] if shared else [np.ascontiguousarray(origins[:, a]) for a in range(3)]
        for p in range(len(scene.lo)):
            idx = None if candidates is None else candidates[p]
            if idx is not None and len(idx) == 0:
                continue
            lo, hi = scene.lo[p], scene.hi[p]
            if yaw[p] != 0.0:
                centre = (lo + hi) / 2.0
                rot = _yaw_matrix(-yaw[p])
                o = origins if idx is None else origins[idx]
                d = dirs if idx is None else dirs[idx]
                o_loc = rows_times(o - centre, rot) + centre
                inv_loc = 1.0 / rows_times(d, rot)
                t, ax = _slab(lo, hi, o_loc, inv_loc)
            else:
                if shared:
                    o = tuple(float(v) for v in origins[0])
                else:
                    o = tuple(o_cols) if idx is None else tuple(c[idx] for c in o_cols)
                inv = tuple(inv_cols) if idx is None else tuple(c[idx] for c in inv_cols)
                t, ax = _slab_axes(lo, hi, o, inv)
            sel = np.arange(R) if idx is None else idx
            better = t < t_best[sel]
            rows = sel[better]
            t_best[rows] = t[better]
            part_best[rows] = p
            axis_best[rows] = ax[better]
    normals = np.zeros((R, 3))
    ok = part_best >= 0
    turned = ok & (yaw[np.maximum(part_best, 0)] != 0.0)
    plain = ok & ~turned
    rows_plain = np.nonzero(plain)[0]
    normals[rows_plain, axis_best[plain]] = -np.sign(dirs[plain, axis_best[plain]])
    for p in np.unique(part_best[turned]):
        rows = np.nonzero(turned & (part_best == p))[0]
        rot = _yaw_matrix(-yaw[p])
        d_loc = rows_times(dirs[rows], rot)
        n_loc = np.zeros((len(rows), 3))
        n_loc[np.arange(len(rows)), axis_best[rows]] = -np.sign(d_loc[np.arange(len(rows)), axis_best[rows]])
        normals[rows] = rows_times(n_loc, rot.T)  # back to the world frame (rot is orthonormal)
    return t_best, part_best, normals


def part_corners(scene: BoxScene, p: int) -> np.ndarray:
    """The 8 world-frame corners of part p (turned by its yaw about its centre)."""
    signs = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=np.float64)
    lo, hi = scene.lo[p], scene.hi[p]
    corners = lo + signs * (hi - lo)
    if scene.yaw is not None and scene.yaw[p] != 0.0:
        centre = (lo + hi) / 2.0
        corners = (corners - centre) @ _yaw_matrix(scene.yaw[p]).T + centre
    return corners


def screen_candidates(scene: BoxScene, K: np.ndarray, pose: np.ndarray, width: int, height: int
                      ) -> List[Optional[np.ndarray]]:
    """Per part, the pixel indices inside its projected bounding rectangle (None = all pixels)."""
    world_to_cam = np.linalg.inv(pose)
    out: List[Optional[np.ndarray]] = []
    for p in range(len(scene.lo)):
        corners = part_corners(scene, p)
        cam = corners @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        if np.any(cam[:, 2] <= 1e-3):
            out.append(None if np.any(cam[:, 2] > 1e-3) else np.zeros(0, dtype=np.int64))
            continue
        u = K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]
        v = K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]
        c0, c1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 1, width - 1)
        r0, r1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 1, height - 1)
        if c0 > c1 or r0 > r1:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        rows, cols = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
        out.append((rows * width + cols).ravel())
    return out


# ----------------------------------------------------------------------------------------------
# Cameras (OpenCV convention: x right, y down, z forward; poses are camera-to-world)


def intrinsics(width: int, height: int, fx: float) -> np.ndarray:
    k = np.eye(4)
    k[0, 0] = k[1, 1] = fx
    k[0, 2] = (width - 1) / 2.0
    k[1, 2] = (height - 1) / 2.0
    return k


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float] = (0, 0, 1)) -> np.ndarray:
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, eye
    return pose


_PIXEL_RAYS: Dict[Tuple[bytes, int, int], Tuple[np.ndarray, np.ndarray]] = {}


def _pixel_rays(K: np.ndarray, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """Camera-frame unit directions per pixel and their norms before normalising (cached per camera)."""
    key = (np.asarray(K, dtype=np.float64)[:3, :3].tobytes(), int(width), int(height))
    hit = _PIXEL_RAYS.get(key)
    if hit is None:
        u, v = np.meshgrid(np.arange(width), np.arange(height))
        x = (u.ravel() - K[0, 2]) / K[0, 0]
        y = (v.ravel() - K[1, 2]) / K[1, 1]
        d_cam = np.stack([x, y, np.ones_like(x)], -1)
        norm = np.linalg.norm(d_cam, axis=1)
        d_cam /= norm[:, None]
        if len(_PIXEL_RAYS) > 16:
            _PIXEL_RAYS.clear()
        hit = _PIXEL_RAYS[key] = (d_cam, norm)
    return hit


def camera_rays(K: np.ndarray, pose: np.ndarray, width: int, height: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World-frame ray origins and unit directions per pixel (row-major), and each ray's z-scale.

    Depth (distance along the optical axis) = t * zscale for a hit at distance t.
    """
    d_cam, norm = _pixel_rays(K, width, height)
    dirs = rows_times(d_cam, pose[:3, :3])
    origins = np.repeat(pose[None, :3, 3], len(dirs), 0)
    return origins, dirs, 1.0 / norm


def render_rgbd(scene: BoxScene, K: np.ndarray, pose: np.ndarray, width: int, height: int,
                max_depth: float = 10.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Depth (metres, 0 = no return), colour (uint8 HxWx3) and part index (-1) of one view."""
    d_cam, norm = _pixel_rays(K, width, height)
    dirs = rows_times(d_cam, pose[:3, :3])
    eye = np.asarray(pose[:3, 3], dtype=np.float64)
    t, part, normals = raycast(scene, eye, dirs, screen_candidates(scene, K, pose, width, height))
    finite = np.isfinite(t)
    depth = np.where(finite, t * (1.0 / norm), 0.0)
    depth[depth > max_depth] = 0.0
    color = np.zeros((len(t), 3), dtype=np.uint8)
    ok = part >= 0
    pts = eye + dirs[ok] * t[ok][:, None]
    hit_part, hit_normal = part[ok], normals[ok]
    # put hits exactly on the face plane (as mesh vertices are), so the texture agrees with the mesh
    axis = np.abs(hit_normal).argmax(1)
    flat = np.ones(len(pts), bool) if scene.yaw is None else scene.yaw[hit_part] == 0.0
    plane = np.where(hit_normal[np.arange(len(pts)), axis] > 0, scene.hi[hit_part, axis], scene.lo[hit_part, axis])
    pts[np.nonzero(flat)[0], axis[flat]] = plane[flat]
    color[ok] = shade(scene.colors[hit_part], hit_normal, pts)
    return depth.reshape(height, width), color.reshape(height, width, 3), part.reshape(height, width)


def rigid(yaw: float, translation: Sequence[float]) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = translation
    return T


def transform(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    return rows_times(points, T[:3, :3]) + T[:3, 3]


# ----------------------------------------------------------------------------------------------
# Spinning lidar (sensor frame: x forward, y left, z up; rays ordered beam-major)


def lidar_directions(elevations: np.ndarray, azimuth_steps: int) -> np.ndarray:
    """Sensor-frame unit directions, (B * A, 3): beam b (elevation, radians), azimuth step a.

    Azimuth step a points at angle 2*pi*a/A counter-clockwise from +x; ray index = b * A + a.
    """
    el = np.asarray(elevations, dtype=np.float64)
    az = 2.0 * np.pi * np.arange(azimuth_steps) / azimuth_steps
    ce, se = np.cos(el)[:, None], np.sin(el)[:, None]
    d = np.stack([ce * np.cos(az)[None], ce * np.sin(az)[None], np.broadcast_to(se, (len(el), azimuth_steps))], -1)
    return d.reshape(-1, 3)


def lidar_candidates(scene: BoxScene, pose: np.ndarray, elevations: np.ndarray, azimuth_steps: int,
                     max_range: float = np.inf) -> List[Optional[np.ndarray]]:
    """Per part, the rays of a spinning lidar at ``pose`` that can hit it (None = all of them).

    The part's azimuth interval (from its corners; the extremes of a convex footprint that does
    not contain the sensor are at corners) and elevation interval (nearest and farthest footprint
    distance) select beams x azimuth steps, with a one-step margin. Parts farther than
    ``max_range`` get no ray.
    """
    el = np.asarray(elevations, dtype=np.float64)
    A = int(azimuth_steps)
    step = 2.0 * np.pi / A
    world_to_sensor = np.linalg.inv(pose)
    origin = pose[:3, 3]
    margin_el = 1e-3
    out: List[Optional[np.ndarray]] = []
    for p in range(len(scene.lo)):
        lo, hi = scene.lo[p], scene.hi[p]
        # sensor position in the part's own frame: inside the footprint -> every ray
        o_loc = origin.copy()
        if scene.yaw is not None and scene.yaw[p] != 0.0:
            centre = (lo + hi) / 2.0
            o_loc = _yaw_matrix(-scene.yaw[p]) @ (origin - centre) + centre
        near = np.clip(o_loc[:2], lo[:2], hi[:2])
        d_min = float(np.linalg.norm(near - o_loc[:2]))
        if d_min > max_range:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        if d_min == 0.0:
            out.append(None)
            continue
        c = part_corners(scene, p) @ world_to_sensor[:3, :3].T + world_to_sensor[:3, 3]
        d_max = float(np.linalg.norm(c[:, :2], axis=1).max())
        zl, zh = c[:, 2].min(), c[:, 2].max()
        e_hi = np.arctan2(zh, d_min if zh > 0 else d_max)
        e_lo = np.arctan2(zl, d_max if zl > 0 else d_min)
        beams = np.nonzero((el >= e_lo - margin_el) & (el <= e_hi + margin_el))[0]
        if len(beams) == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        ang = np.arctan2(c[:, 1], c[:, 0])
        ref = np.arctan2(c[:, 1].mean(), c[:, 0].mean())
        delta = (ang - ref + np.pi) % (2.0 * np.pi) - np.pi
        a0 = int(np.floor((ref + delta.min()) / step)) - 1
        a1 = int(np.ceil((ref + delta.max()) / step)) + 1
        cols = np.arange(a0, a1 + 1) % A
        cols = np.unique(cols) if a1 - a0 + 1 >= A else cols
        out.append((beams[:, None] * A + cols[None, :]).ravel())
    return out


def lidar_scan(scene: BoxScene, pose: np.ndarray, elevations: np.ndarray, azimuth_steps: int,
               max_range: float = 80.0, min_range: float = 1.0) -> Dict[str, np.ndarray]:
    """Ray-cast one revolution: per returned ray the sensor-frame point, range, part and normal.

    ``pose`` is sensor-to-world. Rays with no hit within ``[min_range, max_range]`` return nothing.
    Also returns ``ray`` (the ray index, beam-major) and the world-frame ``dirs`` of those rays.
    """
    d_s = lidar_directions(elevations, azimuth_steps)
    d_w = rows_times(d_s, pose[:3, :3])
    origin = np.asarray(pose[:3, 3], dtype=np.float64)
    cand = lidar_candidates(scene, pose, elevations, azimuth_steps, max_range)
    t, part, normals = raycast(scene, origin, d_w, cand)
    ok = np.isfinite(t) & (t >= min_range) & (t <= max_range) & (part >= 0)
    rays = np.nonzero(ok)[0]
    return {"points": d_s[rays] * t[rays, None], "range": t[rays], "part": part[rays], "normals": normals[rays],
            "ray": rays, "dirs": d_w[rays]}
