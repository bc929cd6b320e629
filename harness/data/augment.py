"""Point-cloud augmentations shared by pre-training methods and downstream tasks.

Each function takes an explicit ``numpy.random.Generator`` (the item's RNG, so a resumed or
distributed run draws the same augmentations) and plain arrays. Geometric ones also return the
4x4 transform they applied, so a method can keep the link between a moved point and the pixel
it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np


@dataclass
class AugmentConfig:
    # rotation uniform in [-rotate_z, rotate_z] radians (pi = any heading) about +z, or with
    # rotate_axis "free" about an axis drawn per sample (PointContrast's pair loader: views in
    # any orientation, gravity included)
    rotate_z: float = 3.141592653589793
    rotate_axis: str = "z"
    # small rotations about x and y (radians, uniform)
    tilt: float = 0.0
    # isotropic scale, uniform in [scale_min, scale_max]
    scale_min: float = 0.9
    scale_max: float = 1.1
    # mirror each axis of flip_axes ("xy", "x" or "y") with probability 0.5
    flip: bool = True
    flip_axes: str = "xy"
    # keep each point with probability 1 - point_dropout (density augmentation), in a scene
    # drawn with probability dropout_prob (CSC's downstream RandomDropout: 0.2 and 0.2)
    point_dropout: float = 0.0
    dropout_prob: float = 1.0
    # colour: brightness/contrast jitter amplitude and per-channel noise std (0..255 units)
    color_jitter: float = 0.1
    color_noise: float = 5.0
    # CSC's downstream colour set: auto-contrast with probability color_autocontrast (blended
    # by a random factor), a per-scene shift uniform in +-color_shift x 255 per channel; the
    # shift and the noise each drawn with probability color_prob (CSC: 0.2, 0.1, 0.95)
    color_autocontrast: float = 0.0
    color_shift: float = 0.0
    color_prob: float = 1.0
    # crop to at most this many points around a random centre (0 = no crop)
    max_points: int = 0
    # elastic distortion before any other geometry: [granularity, magnitude] pairs in metres,
    # applied in turn with probability elastic_prob (CSC's ScanNet: [[0.2, 0.4], [0.8, 1.6]], 0.95)
    elastic: List[List[float]] = field(default_factory=list)
    elastic_prob: float = 0.95
    # keep the points in a cube of half-size clip_bound metres around the scene's centre, moved
    # by clip_shift x its extent per axis (uniform); scenes narrower than clip_bound stay whole
    # (CSC's S3DIS: 4, [0.2, 0.2, 0.05]); 0 = no clip
    clip_bound: float = 0.0
    clip_shift: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    # a random integer offset in [0, coord_shift) per axis of the voxel coordinates (CSC: 100):
    # the parity of the strided grids then varies between samples
    coord_shift: int = 0


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    return T


def rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """4x4 rotation by ``angle`` about ``axis`` (any length but 0), right-handed (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    T = np.eye(4)
    T[:3, :3] = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * (K @ K)
    return T


def random_transform(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A random similarity transform (rotation, tilt, scale, flips) as a 4x4 matrix."""
    if cfg.rotate_axis == "free":
        # PointContrast's sample_random_trans: axis with coordinates uniform in [-0.5, 0.5)
        axis = rng.uniform(-0.5, 0.5, 3)
        while not np.any(axis):
            axis = rng.uniform(-0.5, 0.5, 3)
        T = rotation_about(axis, rng.uniform(-cfg.rotate_z, cfg.rotate_z))
    elif cfg.rotate_axis == "z":
        T = rotation_z(rng.uniform(-cfg.rotate_z, cfg.rotate_z))
    else:
        raise ValueError(f"augment.rotate_axis must be 'z' or 'free', got {cfg.rotate_axis!r}")
    if cfg.tilt > 0:
        for axis in (0, 1):
            a = rng.uniform(-cfg.tilt, cfg.tilt)
            c, s = np.cos(a), np.sin(a)
            R = np.eye(4)
            i, j = [k for k in range(3) if k != axis]
            R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
            T = R @ T
    S = np.eye(4)
    S[:3, :3] *= rng.uniform(cfg.scale_min, cfg.scale_max)
    if cfg.flip:
        for axis in flip_axes(cfg.flip_axes):
            if rng.uniform() < 0.5:
                S[axis, axis] *= -1
    return S @ T


def flip_axes(axes: str) -> tuple:
    """Axis indices of a ``flip_axes`` value ("xy", "x" or "y"); ValueError on anything else."""
    if not axes or any(a not in "xy" for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"augment.flip_axes must be 'xy', 'x' or 'y', got {axes!r}")
    return tuple(sorted("xy".index(a) for a in axes))


def apply(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (points @ T[:3, :3].T + T[:3, 3]).astype(points.dtype, copy=False)


def _chance(rng: np.random.Generator, p: float) -> bool:
    """True with probability ``p``, drawing from ``rng`` only when 0 < p < 1 (so that an option
    left at 0 or 1 leaves every other draw where it was)."""
    return p >= 1 or (p > 0 and rng.uniform() < p)


def jitter_colors(rng: np.random.Generator, colors: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Brightness/contrast jitter, auto-contrast, a per-scene shift and per-point noise on uint8
    colours (as configured); returns float 0..255."""
    c = colors.astype(np.float32)
    if cfg.color_jitter > 0:
        contrast = 1.0 + rng.uniform(-cfg.color_jitter, cfg.color_jitter)
        brightness = 255.0 * rng.uniform(-cfg.color_jitter, cfg.color_jitter)
        mean = c.mean(0, keepdims=True)
        c = (c - mean) * contrast + mean + brightness
    if len(c) and cfg.color_autocontrast > 0 and _chance(rng, cfg.color_autocontrast):
        lo, hi = c.min(0, keepdims=True), c.max(0, keepdims=True)
        stretched = (c - lo) * (255.0 / np.where(hi > lo, hi - lo, 1.0))  # a flat channel stays as it is
        blend = rng.uniform()
        c = np.where(hi > lo, (1 - blend) * c + blend * stretched, c).astype(np.float32)
    if cfg.color_shift > 0 and _chance(rng, cfg.color_prob):
        c = np.clip(c + 255.0 * rng.uniform(-cfg.color_shift, cfg.color_shift, (1, 3)).astype(np.float32), 0, 255)
    if cfg.color_noise > 0 and _chance(rng, cfg.color_prob):
        c = c + rng.normal(0, cfg.color_noise, c.shape).astype(np.float32)
    return np.clip(c, 0, 255)


def dropout_mask(rng: np.random.Generator, n: int, rate: float, prob: float = 1.0) -> np.ndarray:
    """Each point kept with probability 1 - ``rate``, in a scene drawn with probability ``prob``;
    at least one point is kept."""
    if rate <= 0 or not _chance(rng, prob):
        return np.ones(n, dtype=bool)
    keep = rng.uniform(size=n) >= rate
    if not keep.any():
        keep[rng.integers(n)] = True
    return keep


def elastic_distort(rng: np.random.Generator, points: np.ndarray, granularity: float, magnitude: float) -> np.ndarray:
    """Points moved by a smooth random field: standard-normal noise on a grid of ``granularity``
    spacing that reaches one cell beyond the points on every side, smoothed by two passes of a
    3-cell box filter along each axis (zeros outside), read trilinearly at each point and scaled by
    ``magnitude``. A grid node inside the points' box moves by ``magnitude`` x N(0, (19/81)^3)
    per axis (each pass pair is the kernel [1, 2, 3, 2, 1] / 9)."""
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import uniform_filter1d

    if len(points) == 0:
        return points
    lo = points.min(0).astype(np.float64)
    dims = ((points.max(0) - lo) // granularity).astype(int) + 3
    noise = rng.standard_normal((*dims, 3)).astype(np.float32)
    for _ in range(2):
        for axis in range(3):
            noise = uniform_filter1d(noise, 3, axis=axis, mode="constant", cval=0.0)
    axes = [lo[k] - granularity + granularity * np.arange(dims[k]) for k in range(3)]
    field = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0.0)
    return (points + field(points) * magnitude).astype(points.dtype, copy=False)


def elastic_distortions(rng: np.random.Generator, points: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """``cfg.elastic``'s distortions in turn, all of them with probability ``cfg.elastic_prob``."""
    if not cfg.elastic or not _chance(rng, cfg.elastic_prob):
        return points
    for granularity, magnitude in cfg.elastic:
        points = elastic_distort(rng, points, float(granularity), float(magnitude))
    return points


def shift_voxels(rng: np.random.Generator, coords: np.ndarray, shift: int) -> np.ndarray:
    """Voxel coordinates moved by a random integer offset in [0, shift) per axis (0 = as they are):
    the parity of the strided grids then differs between samples."""
    return coords + rng.integers(0, shift, 3) if shift > 0 else coords


def clip_mask(rng: np.random.Generator, points: np.ndarray, bound: float, shift) -> np.ndarray:
    """The points in the cube of half-size ``bound`` (lower faces closed, upper open) around the
    centre of their box moved by ``shift[k]`` x its extent along axis k (uniform in +-shift);
    all of them when 0 or when the box is nowhere wider than ``bound``."""
    n = len(points)
    if bound <= 0 or n == 0:
        return np.ones(n, dtype=bool)
    lo, hi = points.min(0).astype(np.float64), points.max(0).astype(np.float64)
    size = hi - lo
    centre = lo + size / 2 + rng.uniform(-1.0, 1.0, 3) * np.asarray(shift, dtype=np.float64) * size
    if size.max() < bound:
        return np.ones(n, dtype=bool)
    keep = np.all((points >= centre - bound) & (points < centre + bound), axis=1)
    return keep if keep.any() else np.ones(n, dtype=bool)  # a cube between sparse points: the whole scene


def crop_mask(rng: np.random.Generator, points: np.ndarray, max_points: int) -> np.ndarray:
    """The ``max_points`` points nearest (in xy) to a random point; all points if fewer."""
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return np.ones(n, dtype=bool)
    centre = points[rng.integers(n), :2]
    d = np.sum((points[:, :2] - centre) ** 2, axis=1)
    keep = np.zeros(n, dtype=bool)
    keep[np.argpartition(d, max_points - 1)[:max_points]] = True
    return keep


def color_features(colors: np.ndarray) -> np.ndarray:
    """Input features RGB/255 - 0.5 (the published recipes' colour features)."""
    return (np.asarray(colors, dtype=np.float32) / 255.0 - 0.5).astype(np.float32)


INPUT_FEATURES = {
    "rgb": lambda colors: color_features(colors),
    "ones": lambda colors: np.ones((len(colors), 3), dtype=np.float32),
}


def input_features(kind: str, colors: np.ndarray) -> np.ndarray:
    """Backbone input features of the given kind ('rgb' or 'ones', 3 channels each)."""
    if kind not in INPUT_FEATURES:
        raise ValueError(f"input_features {kind!r} is unknown; known: {', '.join(INPUT_FEATURES)}")
    return INPUT_FEATURES[kind](colors)
