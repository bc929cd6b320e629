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
    # rotation about +z, uniform in [-rotate_z, rotate_z] radians (pi = any heading)
    rotate_z: float = 3.141592653589793
    # small rotations about x and y (radians, uniform)
    tilt: float = 0.0
    # isotropic scale, uniform in [scale_min, scale_max]
    scale_min: float = 0.9
    scale_max: float = 1.1
    # mirror each axis of flip_axes ("xy", "x" or "y") with probability 0.5
    flip: bool = True
    flip_axes: str = "xy"
    # keep each point with probability 1 - point_dropout (density augmentation)
    point_dropout: float = 0.0
    # colour: brightness/contrast jitter amplitude and per-channel noise std (0..255 units)
    color_jitter: float = 0.1
    color_noise: float = 5.0
    # crop to at most this many points around a random centre (0 = no crop)
    max_points: int = 0


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    return T


def random_transform(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A random similarity transform (rotation, tilt, scale, flips) as a 4x4 matrix."""
    T = rotation_z(rng.uniform(-cfg.rotate_z, cfg.rotate_z))
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


def jitter_colors(rng: np.random.Generator, colors: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Brightness/contrast jitter and per-point noise on uint8 colours; returns float 0..255."""
    c = colors.astype(np.float32)
    if cfg.color_jitter > 0:
        contrast = 1.0 + rng.uniform(-cfg.color_jitter, cfg.color_jitter)
        brightness = 255.0 * rng.uniform(-cfg.color_jitter, cfg.color_jitter)
        mean = c.mean(0, keepdims=True)
        c = (c - mean) * contrast + mean + brightness
    if cfg.color_noise > 0:
        c = c + rng.normal(0, cfg.color_noise, c.shape).astype(np.float32)
    return np.clip(c, 0, 255)


def dropout_mask(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    if rate <= 0:
        return np.ones(n, dtype=bool)
    keep = rng.uniform(size=n) >= rate
    if not keep.any():
        keep[rng.integers(n)] = True
    return keep


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
