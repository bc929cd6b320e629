"""Voxelisation of a point cloud, with the inverse map back to the points.

``voxelize`` is numpy-only (the data layer calls it in worker processes); ``batch_coords``
builds the ``(N, 4)`` int32 coordinates (batch index first) that the backbones take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["Voxelized", "voxelize", "batch_coords"]


@dataclass
class Voxelized:
    """The result of :func:`voxelize`.

    ``coords``: (M, 3) int32 voxel coordinates ``floor(points / voxel_size)``, unique, sorted
    lexicographically (x, then y, then z).
    ``index``: (M,) int64 row of each voxel's representative point.
    ``inverse``: (N,) int64 voxel of each point, so ``voxel_values[inverse]`` maps per-voxel
    predictions back onto the original points.
    ``labels``: (M,) voxel labels when labels were given, else None.
    """

    coords: np.ndarray
    index: np.ndarray
    inverse: np.ndarray
    labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.coords)


def _pack(coords: np.ndarray) -> np.ndarray:
    """int64 keys that sort like the coordinate rows (lexicographic)."""
    lo = coords.min(axis=0)
    shifted = (coords - lo).astype(np.int64)
    extent = shifted.max(axis=0) + 1
    if float(np.prod(extent.astype(np.float64))) >= 2.0**62:
        raise ValueError(f"voxelize: coordinate extent {extent.tolist()} is too large to index")
    return (shifted[:, 0] * extent[1] + shifted[:, 1]) * extent[2] + shifted[:, 2]


def voxelize(points, voxel_size: float, labels=None, mode: str = "first", ignore_index: int = -100,
             rng: Optional[np.random.Generator] = None) -> Voxelized:
    """Voxelise ``points`` (N, 3) at ``voxel_size``.

    Each voxel keeps one representative point: the first in input order, or a random one when
    ``rng`` is given (a fresh choice per call, as augmentation wants). With ``labels`` (N,),
    ``mode="first"`` gives each voxel its representative point's label and ``mode="vote"``
    the majority label of its points (ties go to the smallest label; ``ignore_index`` points
    do not vote, and a voxel gets ``ignore_index`` only when all its points are ignored).
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"voxelize: points must have shape (N, 3), got {pts.shape}")
    if len(pts) == 0:
        raise ValueError("voxelize: empty point cloud")
    if not np.issubdtype(pts.dtype, np.floating):
        pts = pts.astype(np.float64)
    if not (voxel_size > 0):
        raise ValueError(f"voxelize: voxel_size must be positive, got {voxel_size}")
    if mode not in ("first", "vote"):
        raise ValueError(f"voxelize: mode must be 'first' or 'vote', got {mode!r}")
    if not np.isfinite(pts).all():
        raise ValueError("voxelize: points contain NaN or inf")
    grid = np.floor(pts.astype(np.float64) / voxel_size)
    if np.abs(grid).max() >= 2**31 - 1:
        raise ValueError("voxelize: voxel coordinates overflow int32; check the units of voxel_size")
    grid = grid.astype(np.int32)
    keys = _pack(grid)
    if rng is None:
        # np.unique sorts stably when return_index is asked, so index is the first occurrence.
        _, index, inverse = np.unique(keys, return_index=True, return_inverse=True)
    else:
        perm = rng.permutation(len(keys))
        _, first, inv_perm = np.unique(keys[perm], return_index=True, return_inverse=True)
        index = perm[first]
        inverse = np.empty(len(keys), dtype=np.int64)
        inverse[perm] = inv_perm.reshape(-1)
    index = index.astype(np.int64)
    inverse = inverse.reshape(-1).astype(np.int64)
    coords = grid[index]
    out_labels = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (len(pts),):
            raise ValueError(f"voxelize: labels must have shape ({len(pts)},), got {lab.shape}")
        if mode == "first":
            out_labels = lab[index]
        else:
            out_labels = _vote(lab.astype(np.int64), inverse, len(index), ignore_index).astype(lab.dtype)
    return Voxelized(coords=coords, index=index, inverse=inverse, labels=out_labels)


def _vote(labels: np.ndarray, inverse: np.ndarray, n_voxels: int, ignore_index: int) -> np.ndarray:
    out = np.full(n_voxels, ignore_index, dtype=np.int64)
    valid = labels != ignore_index
    if not valid.any():
        return out
    vox, lab = inverse[valid], labels[valid]
    pairs, counts = np.unique(np.stack([vox, lab], axis=1), axis=0, return_counts=True)
    # Per voxel: highest count first, then smallest label.
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    pairs = pairs[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    out[pairs[first, 0]] = pairs[first, 1]
    return out


def batch_coords(coords_list: Sequence) -> "torch.Tensor":  # noqa: F821
    """Stack per-item (M_i, 3) integer coordinates into one (sum M_i, 4) int32 tensor, batch index first."""
    import torch

    if len(coords_list) == 0:
        raise ValueError("batch_coords: empty batch")
    parts = []
    for b, c in enumerate(coords_list):
        t = torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c)
        if t.ndim != 2 or t.shape[1] != 3:
            raise ValueError(f"batch_coords: item {b} must have shape (M, 3), got {tuple(t.shape)}")
        if t.is_floating_point():
            raise ValueError(f"batch_coords: item {b} has float coordinates ({t.dtype}); voxelize first")
        t = t.to(torch.int32)
        parts.append(torch.cat([torch.full((t.shape[0], 1), b, dtype=torch.int32, device=t.device), t], dim=1))
    return torch.cat(parts, dim=0)
