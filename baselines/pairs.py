"""Overlapping RGB-D frame pairs of a scene, and point correspondences between two frames.

Used by the multi-scan methods (PointContrast, CSC; ``consumes = ("frame_pairs",)``) and by any
other method that learns from registered frame pairs; it needs only a dataset whose
``frames(scene)`` returns frame references with ``load()`` (a ``harness.data.frames.Frame``)
and, for the fast path, ``depth_path`` / ``pose_path`` / ``k_depth`` / ``depth_scale``.

Overlap. Each frame's depth is back-projected into world coordinates (its camera-to-world
pose) and voxelised at ``voxel_size``; a voxelised frame is the set of centres of its occupied
voxels. overlap(A, B) is the fraction of A's points that have a point of B within
``radius_factor * voxel_size``. Between voxel centres that distance test is exact on integer
voxel offsets ``d`` (|d| <= radius_factor; 19 offsets for 1.5), so the overlap of every pair
of a scene comes from one spatial hash of the union of the frames' voxels:

- P[u, f] = voxel u is occupied in frame f (bits);
- D[u, f] = OR over the offsets d of P[u + d, f] (frame f has a point near u), with the
  neighbours found in a dense index grid over the scene (or a hash index for huge extents);
- count(A, B) = sum_u P[u, A] AND D[u, B]: popcounts of per-frame bitsets over the voxels.

No loop over pairs or points. As in the public pair-mining script (CSC's
``compute_full_overlapping.py``), a pair {A, B} is kept when max(overlap(A, B),
overlap(B, A)) >= ``min_overlap``; both directed overlaps are stored. The estimate differs from
that script's in one respect: it tests voxel centres on a world grid, where the script tests the
centroids of Open3D's ``voxel_down_sample`` with a KD-tree (on synthetic frames the overlaps
differ by -0.04 to +0.02, which moves only pairs at the threshold).

Pairs are cached per scene under ``<cache_dir>/frame-pairs/``, keyed by the scene, the
parameters and a fingerprint of the frame files (path, size, mtime), written atomically.

Correspondences (the positives of the contrastive losses): after registration (both frames
in world coordinates), each point of A is matched to its nearest point of B when that one lies
within ``radius_factor * voxel_size`` (scipy's KD-tree), as the recipe says; the public trainers
take a random point of B within that radius instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from harness.config import to_plain

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_BITS = 21  # bits per axis in a packed voxel key
_BIAS = 1 << (_BITS - 1)
_LIMIT = _BIAS - 2  # |voxel coordinate| bound that keeps key + offset inside its field


@dataclass
class PairsConfig:
    # Voxel size (metres) of the frames' point clouds when measuring overlap (public script: 0.05)
    voxel_size: float = 0.05
    # A point of A overlaps B when B has a point within radius_factor x voxel_size
    radius_factor: float = 1.5
    # Keep a pair when max(overlap(A,B), overlap(B,A)) >= min_overlap
    min_overlap: float = 0.3
    # Use every N-th frame the dataset lists (1 = all)
    frame_skip: int = 1
    # Back-project every N-th depth pixel in x and y (1 = all)
    depth_stride: int = 1
    # Ignore depth beyond this many metres (0 = no limit)
    max_depth: float = 0.0
    # Threads that load and voxelise frames (0 = min(4, CPUs))
    workers: int = 0


# ----------------------------------------------------------------------------------------------
# Voxel keys


def pack_keys(ijk: np.ndarray) -> np.ndarray:
    """int64 keys of integer voxel coordinates (M, 3); adding ``offset_key(d)`` moves by d."""
    ijk = np.asarray(ijk, dtype=np.int64)
    if ijk.size and np.abs(ijk).max() > _LIMIT:
        raise ValueError(f"pairs: voxel coordinates reach {int(np.abs(ijk).max())}, beyond +-{_LIMIT}; "
                         "check the depth units and the voxel size")
    return ((ijk[:, 0] + _BIAS) << (2 * _BITS)) | ((ijk[:, 1] + _BIAS) << _BITS) | (ijk[:, 2] + _BIAS)


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    mask = (1 << _BITS) - 1
    return np.stack([(keys >> (2 * _BITS)) - _BIAS, ((keys >> _BITS) & mask) - _BIAS, (keys & mask) - _BIAS], -1)


def offset_key(d: Sequence[int]) -> int:
    return (int(d[0]) << (2 * _BITS)) + (int(d[1]) << _BITS) + int(d[2])


def neighbour_offsets(radius_factor: float) -> np.ndarray:
    """Integer offsets d with |d| <= radius_factor (voxel centres within the radius), (K, 3)."""
    if not radius_factor > 0:
        raise ValueError(f"pairs.radius_factor must be positive, got {radius_factor}")
    r = int(np.floor(radius_factor))
    g = np.arange(-r, r + 1)
    d = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    # integer squared norms against r^2 with a relative tolerance for r^2 given in decimal
    keep = (d ** 2).sum(1) <= radius_factor ** 2 * (1 + 1e-12)
    return d[keep]


def voxel_keys(points: np.ndarray, voxel_size: float) -> np.ndarray:
    """Unique packed keys of the voxels occupied by ``points`` (N, 3)."""
    import pandas as pd

    if not voxel_size > 0:
        raise ValueError(f"pairs.voxel_size must be positive, got {voxel_size}")
    pts = np.asarray(points)
    if len(pts) == 0:
        return np.zeros(0, dtype=np.int64)
    return pd.unique(pack_keys(np.floor(pts / voxel_size).astype(np.int64)))


# ----------------------------------------------------------------------------------------------
# Frames -> voxel keys


class _Rays:
    """Per-pixel normalised camera rays (x/z, y/z) for one depth resolution and intrinsics."""

    def __init__(self) -> None:
        self._cache: Dict[Any, Tuple[np.ndarray, np.ndarray]] = {}

    def get(self, shape: Tuple[int, int], K: np.ndarray, stride: int) -> Tuple[np.ndarray, np.ndarray]:
        key = (shape, np.asarray(K, dtype=np.float64)[:3, :3].tobytes(), stride)
        if key not in self._cache:
            h, w = shape
            rows = np.arange(0, h, stride, dtype=np.float64)
            cols = np.arange(0, w, stride, dtype=np.float64)
            x = ((cols - K[0, 2]) / K[0, 0])[None, :].repeat(len(rows), 0)
            y = ((rows - K[1, 2]) / K[1, 1])[:, None].repeat(len(cols), 1)
            self._cache[key] = (x.ravel().astype(np.float32), y.ravel().astype(np.float32))
        return self._cache[key]


def world_points(depth: np.ndarray, K: np.ndarray, pose: np.ndarray, stride: int = 1, max_depth: float = 0.0,
                 rays: Optional[_Rays] = None) -> np.ndarray:
    """World-frame points (N, 3) float32 of the measured pixels of a depth map (metres)."""
    rays = rays or _Rays()
    x, y = rays.get(depth.shape, K, stride)
    z = np.ascontiguousarray(depth[::stride, ::stride], dtype=np.float32).ravel()
    valid = z > 0
    if max_depth > 0:
        valid &= z <= max_depth
    x, y, z = x[valid], y[valid], z[valid]
    R = np.asarray(pose, dtype=np.float64)
    out = np.empty((len(z), 3), dtype=np.float32)
    # elementwise (a (N,3) @ (3,3) product is far slower in numpy for large N)
    for k in range(3):
        out[:, k] = (np.float32(R[k, 0]) * x + np.float32(R[k, 1]) * y + np.float32(R[k, 2])) * z \
            + np.float32(R[k, 3])
    return out


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` (N, 3) moved by the 4x4 ``T``, float32, computed elementwise."""
    T = np.asarray(T, dtype=np.float64)
    p = np.asarray(points, dtype=np.float32)
    out = np.empty((len(p), 3), dtype=np.float32)
    for k in range(3):
        out[:, k] = np.float32(T[k, 0]) * p[:, 0] + np.float32(T[k, 1]) * p[:, 1] + np.float32(T[k, 2]) * p[:, 2] \
            + np.float32(T[k, 3])
    return out


def _frame_geometry(ref: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth, K_depth, pose) of a frame reference, reading only depth and pose when it can."""
    if all(hasattr(ref, a) for a in ("depth_path", "pose", "k_depth")):
        from harness.data.frames import read_depth_png

        depth = read_depth_png(Path(ref.depth_path), float(getattr(ref, "depth_scale", 1000.0)))
        return depth, np.asarray(ref.k_depth, dtype=np.float64), np.asarray(ref.pose(), dtype=np.float64)
    frame = ref.load()
    return frame.depth, np.asarray(frame.k_depth, dtype=np.float64), np.asarray(frame.pose, dtype=np.float64)


def frame_name(ref: Any, position: int) -> str:
    return str(getattr(ref, "index", getattr(ref, "name", position)))


# ----------------------------------------------------------------------------------------------
# Overlap of every pair


def overlap_matrix(key_sets: Sequence[np.ndarray], radius_factor: float = 1.5, chunk: int = 1 << 16,
                   max_grid_cells: int = 1 << 26) -> np.ndarray:
    """O[a, b] = fraction of frame a's voxels with an occupied voxel of frame b within the radius.

    ``key_sets``: per frame, its unique packed voxel keys (``voxel_keys``). O[a, a] = 1; a frame
    without voxels has overlap 0 with every frame. Voxels are indexed through a dense grid over
    the scene's bounding box when it has at most ``max_grid_cells`` cells, else through a hash
    index; the counts are popcounts of per-frame bitsets over the union of the voxels.
    """
    F = len(key_sets)
    out = np.zeros((F, F), dtype=np.float64)
    sizes = np.array([len(k) for k in key_sets], dtype=np.int64)
    if F == 0 or sizes.sum() == 0:
        return out
    index = _VoxelIndex(np.concatenate([np.asarray(k, dtype=np.int64) for k in key_sets]), max_grid_cells)
    codes, U, words = index.codes, index.size, (F + 7) // 8
    # P[u]: bits of the frames occupying voxel u (row layout, for the dilation)
    P = np.zeros((U, words), dtype=np.uint8)
    start = 0
    for f, n in enumerate(sizes):  # keys are unique within a frame: no repeated index per assignment
        P[codes[start:start + n], f >> 3] |= np.uint8(1 << (f & 7))
        start += n
    # D[u]: bits of the frames with a voxel within the radius of u
    D = P.copy()
    for d in neighbour_offsets(radius_factor):
        if d.any():
            nb = index.neighbours(d)
            hit = nb >= 0
            D[hit] |= P[nb[hit]]
    # count(a, b) = popcount(Pcol[a] & Dcol[b]) over the voxels, restricted to a's non-empty words
    Pc, Dc = _columns(P, F, chunk), _columns(D, F, chunk)
    for a in range(F):
        nz = np.flatnonzero(Pc[a])
        out[a] = _popcount_rows(Dc[:, nz] & Pc[a, nz]) / max(sizes[a], 1)
    return out


class _VoxelIndex:
    """Ids 0..size-1 of the distinct voxels among ``keys`` (``codes``: the id of each key) and
    ``neighbours(d)``: the id of each distinct voxel moved by offset d, or -1 (looked up in a
    dense id grid over the voxels' bounding box when it is small enough, else in a hash index)."""

    def __init__(self, keys: np.ndarray, max_grid_cells: int):
        import pandas as pd

        self.codes, union = pd.factorize(keys, sort=False)
        self.union = np.asarray(union, dtype=np.int64)
        self.size = len(self.union)
        ijk = unpack_keys(self.union)
        lo = ijk.min(0) - 2
        extent = ijk.max(0) - lo + 3
        self.grid: Optional[np.ndarray] = None
        if float(np.prod(extent.astype(np.float64))) <= max_grid_cells:
            self._cell = ijk - lo
            self.grid = np.full(tuple(int(e) for e in extent), -1, dtype=np.int32 if self.size < 2**31 else np.int64)
            self.grid[self._cell[:, 0], self._cell[:, 1], self._cell[:, 2]] = np.arange(self.size)
        else:
            self._index = pd.Index(self.union)

    def neighbours(self, d: np.ndarray) -> np.ndarray:
        if self.grid is not None:
            c = self._cell
            return self.grid[c[:, 0] + d[0], c[:, 1] + d[1], c[:, 2] + d[2]].astype(np.int64)
        return self._index.get_indexer(self.union + offset_key(d))


def _columns(rows: np.ndarray, F: int, chunk: int) -> np.ndarray:
    """Row bitsets (U, ceil(F/8)) -> column bitsets (F, ceil(U/64)) uint64."""
    U = len(rows)
    n64 = (U + 63) // 64
    out = np.zeros((F, n64 * 8), dtype=np.uint8)
    chunk = max(64, chunk - chunk % 64)
    for r0 in range(0, U, chunk):
        bits = np.unpackbits(rows[r0:r0 + chunk], axis=1, count=F, bitorder="little")  # (n, F)
        packed = np.packbits(np.ascontiguousarray(bits.T), axis=1, bitorder="little")  # (F, ceil(n/8))
        out[:, r0 // 8:r0 // 8 + packed.shape[1]] = packed
    return out.view(np.uint64)


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_rows(x: np.ndarray) -> np.ndarray:
    """Number of set bits per row of a uint64 matrix, as float64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).sum(axis=1, dtype=np.int64).astype(np.float64)
    return _POP8[np.ascontiguousarray(x).view(np.uint8)].sum(axis=1, dtype=np.int64).astype(np.float64)


def select_pairs(overlap: np.ndarray, min_overlap: float) -> np.ndarray:
    """Rows (i, j) with i < j and max(O[i, j], O[j, i]) >= min_overlap, (K, 2) int64."""
    sym = np.maximum(overlap, overlap.T)
    i, j = np.nonzero(np.triu(sym >= min_overlap, k=1))
    return np.stack([i, j], -1).astype(np.int64)


@dataclass
class ScenePairs:
    """The mined pairs of one scene. ``pairs`` index ``dataset.frames(scene)`` (the full list)."""

    scene: str
    frames: List[str]  # names of the frames considered (after frame_skip and invalid poses)
    positions: List[int]  # their positions in dataset.frames(scene)
    pairs: np.ndarray  # (K, 2) positions in dataset.frames(scene), first < second
    overlap: np.ndarray  # (K, 2) overlap(first, second), overlap(second, first)
    voxels: List[int] = field(default_factory=list)  # voxels per considered frame
    seconds: float = 0.0

    def to_json(self) -> Dict[str, Any]:
        return {"scene": self.scene, "frames": self.frames, "positions": self.positions,
                "pairs": self.pairs.tolist(), "overlap": self.overlap.tolist(),
                "voxels": self.voxels, "seconds": round(self.seconds, 3)}

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "ScenePairs":
        return ScenePairs(d["scene"], list(d["frames"]), [int(p) for p in d["positions"]],
                          np.asarray(d["pairs"], dtype=np.int64).reshape(-1, 2),
                          np.asarray(d["overlap"], dtype=np.float64).reshape(-1, 2), list(d.get("voxels", [])),
                          float(d.get("seconds", 0.0)))


def _workers(cfg: Any) -> int:
    n = int(getattr(cfg, "workers", 0) or 0)
    return n if n > 0 else max(1, min(4, os.cpu_count() or 1))


def mine_pairs(scene: str, refs: Sequence[Any], cfg: Any, progress: bool = False) -> ScenePairs:
    """Load the frames of one scene, voxelise them in world coordinates and keep overlapping pairs."""
    start = time.time()
    if int(cfg.frame_skip) < 1 or int(cfg.depth_stride) < 1:
        raise ValueError(f"pairs.frame_skip and pairs.depth_stride must be >= 1, got {cfg.frame_skip}, "
                         f"{cfg.depth_stride}")
    positions = list(range(0, len(refs), int(cfg.frame_skip)))
    rays = _Rays()

    def keys_of(pos: int) -> Optional[np.ndarray]:
        depth, K, pose = _frame_geometry(refs[pos])
        if not np.isfinite(pose).all():
            return None  # ScanNet marks failed tracking with -inf poses
        pts = world_points(depth, K, pose, int(cfg.depth_stride), float(cfg.max_depth), rays)
        return voxel_keys(pts, float(cfg.voxel_size))

    results: List[Optional[np.ndarray]] = []
    with ThreadPoolExecutor(max_workers=_workers(cfg)) as pool, \
            _Progress(progress, f"pairs {scene}", len(positions)) as step:
        if positions:  # the first frame fills the ray cache; the threads then only read it
            results.append(keys_of(positions[0]))
            step(1)
        for keys in pool.map(keys_of, positions[1:]):
            results.append(keys)
            step(1)
    kept = [(p, k) for p, k in zip(positions, results) if k is not None and len(k)]
    dropped = len(positions) - len(kept)
    if dropped:
        log.info("pairs.frames_skipped scene=%s count=%d reason=invalid-pose-or-no-depth", scene, dropped)
    O = overlap_matrix([k for _, k in kept], float(cfg.radius_factor))
    sel = select_pairs(O, float(cfg.min_overlap))
    pos = np.array([p for p, _ in kept], dtype=np.int64)
    pairs = pos[sel] if len(sel) else np.zeros((0, 2), dtype=np.int64)
    overlap = np.stack([O[sel[:, 0], sel[:, 1]], O[sel[:, 1], sel[:, 0]]], -1) if len(sel) else np.zeros((0, 2))
    out = ScenePairs(scene, [frame_name(refs[p], p) for p, _ in kept], [int(p) for p, _ in kept], pairs, overlap,
                     [int(len(k)) for _, k in kept], time.time() - start)
    log.info("pairs.mined scene=%s frames=%d pairs=%d seconds=%.2f", scene, len(kept), len(pairs), out.seconds)
    return out


class _Progress:
    """A transient rich progress bar (or nothing)."""

    def __init__(self, enabled: bool, name: str, total: int):
        self.enabled, self.name, self.total = enabled, name, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=True)
        self._p.__enter__()
        task = self._p.add_task(self.name, total=self.total)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._p.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# Cache


def _file_id(path: Any) -> List[Any]:
    p = Path(path)
    try:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p), None, None]


def frames_fingerprint(refs: Sequence[Any]) -> str:
    """A hash of the frame files (path, size, mtime of depth and pose): new files, new pairs."""
    items = []
    for i, ref in enumerate(refs):
        entry: List[Any] = [frame_name(ref, i)]
        for attr in ("depth_path", "pose_path"):
            if hasattr(ref, attr):
                entry += _file_id(getattr(ref, attr))
        items.append(entry)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _mining_params(cfg: Any) -> Dict[str, Any]:
    p = dict(to_plain(cfg))
    p.pop("workers", None)  # does not change the result
    return p


def cache_path(cache_dir: Path, scene: str, refs: Sequence[Any], cfg: Any) -> Tuple[Path, Dict[str, Any]]:
    params = {"version": CACHE_VERSION, "scene": scene, "params": _mining_params(cfg),
              "frames": frames_fingerprint(refs)}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "frame-pairs" / f"{scene}-{key}.json", params


def scene_pairs(dataset: Any, scene: str, cfg: Any, cache_dir: Optional[Path], progress: bool = False) -> ScenePairs:
    """The pairs of ``scene``: from the cache when mined before with the same parameters and frames."""
    from harness.data.cache import atomic_write_json, file_lock

    refs = list(dataset.frames(scene))
    if cache_dir is None:
        return mine_pairs(scene, refs, cfg, progress)
    path, params = cache_path(Path(cache_dir), scene, refs, cfg)
    cached = _read_cache(path, params)
    if cached is not None:
        return cached
    with file_lock(path.with_name(f".{path.name}.lock")):  # ranks or jobs starting together mine once
        cached = _read_cache(path, params)
        if cached is not None:
            return cached
        result = mine_pairs(scene, refs, cfg, progress)
        atomic_write_json(path, {"key": params, "result": result.to_json()})
    return result


def _read_cache(path: Path, params: Dict[str, Any]) -> Optional[ScenePairs]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("key") == params:
            log.debug("pairs.cache_hit scene=%s file=%s", params.get("scene"), path)
            return ScenePairs.from_json(data["result"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        log.warning("pairs.cache_unreadable file=%s error=%s action=recompute", path, exc)
    return None


def dataset_cache_dir(dataset: Any) -> Optional[Path]:
    """The dataset's cache directory (``dataset.cfg.cache_dir``), when it has one."""
    cfg = getattr(dataset, "cfg", None)
    value = getattr(cfg, "cache_dir", None) if cfg is not None else None
    if value is None:
        value = os.environ.get("HARNESS_CACHE")
    return Path(str(value)) if value else None


# ----------------------------------------------------------------------------------------------
# Correspondences


def correspondences(points_a: np.ndarray, points_b: np.ndarray, radius: float,
                    pose_a: Optional[np.ndarray] = None, pose_b: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Rows (ia, ib): each point of A matched to its nearest point of B within ``radius``.

    The points are registered first: with ``pose_a`` / ``pose_b`` (4x4, to world) they are
    given in their own frames; without, they are already in one frame. Points of A with no
    point of B within the radius are left out.
    """
    from scipy.spatial import cKDTree

    a = np.asarray(points_a, dtype=np.float64)
    b = np.asarray(points_b, dtype=np.float64)
    if pose_a is not None:
        a = a @ np.asarray(pose_a)[:3, :3].T + np.asarray(pose_a)[:3, 3]
    if pose_b is not None:
        b = b @ np.asarray(pose_b)[:3, :3].T + np.asarray(pose_b)[:3, 3]
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    dist, idx = cKDTree(b).query(a, k=1, distance_upper_bound=radius * (1 + 1e-6))
    ok = dist <= radius
    return np.nonzero(ok)[0].astype(np.int64), idx[ok].astype(np.int64)
