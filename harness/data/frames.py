"""RGB-D frames: loading the exported frame layout, back-projection and projection.

The layout is ScanNet's SensReader export, per scene: ``color/<i>.jpg``, ``depth/<i>.png``
(uint16 millimetres), ``pose/<i>.txt`` (4x4 camera-to-world), ``intrinsic/intrinsic_color.txt``
and ``intrinsic/intrinsic_depth.txt`` (4x4). Cameras follow the OpenCV convention (x right,
y down, z forward). Colour and depth images may differ in resolution; each has its intrinsics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image


@dataclass
class Frame:
    """One RGB-D frame in memory."""

    color: np.ndarray  # (Hc, Wc, 3) uint8
    depth: np.ndarray  # (Hd, Wd) float32 metres, 0 = no measurement
    pose: np.ndarray  # (4, 4) camera-to-world
    k_color: np.ndarray  # (3, 3)
    k_depth: np.ndarray  # (3, 3)
    name: str = ""

    def points(self, world: bool = True, stride: int = 1, max_depth: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
        """Back-projected depth points (world or camera frame) and their colours (N,3) uint8."""
        pts_cam, _ = backproject(self.depth, self.k_depth, stride=stride, max_depth=max_depth)
        colors = sample_colors(pts_cam, self.color, self.k_color)
        pts = transform_points(self.pose, pts_cam) if world else pts_cam
        return pts.astype(np.float32), colors


@dataclass
class FrameRef:
    """A frame on disk, loaded on demand (datasets list thousands of frames)."""

    scene: str
    index: int
    color_path: Path
    depth_path: Path
    pose_path: Path
    k_color: np.ndarray
    k_depth: np.ndarray
    depth_scale: float = 1000.0  # raw depth units per metre
    # (width, height) the intrinsics were recorded for (the export's export.json), None = unknown
    color_size: Optional[Tuple[int, int]] = None
    depth_size: Optional[Tuple[int, int]] = None

    def pose(self) -> np.ndarray:
        return read_matrix(self.pose_path)

    def load(self) -> Frame:
        color = np.asarray(Image.open(self.color_path).convert("RGB"))
        depth = read_depth_png(self.depth_path, self.depth_scale)
        k_color = intrinsics_for(self.k_color, self.color_size, color.shape[1], color.shape[0], self.color_path)
        k_depth = intrinsics_for(self.k_depth, self.depth_size, depth.shape[1], depth.shape[0], self.depth_path)
        return Frame(color, depth, self.pose(), k_color, k_depth, f"{self.scene}/{self.index}")


def intrinsics_for(K: np.ndarray, recorded: Optional[Tuple[int, int]], width: int, height: int, image: Path,
                   centre_tolerance: float = 0.2) -> np.ndarray:
    """``K`` for an image of ``width`` x ``height`` pixels.

    Why: exporters often resize the colour images (ScanNet's SensReader to 640x480) but keep the
    1296x968 intrinsics; projected with those, every point lands on the wrong pixel and most fall
    outside the image, with nothing to show for it. Where the size the intrinsics were recorded for is
    known and the image is a uniform resize of it, ``K`` is rescaled (pixel centres at integers:
    ``u' = (u + 0.5) s - 0.5``); any other mismatch is a ValueError naming the image. Where it is
    unknown, an image whose centre is far (``centre_tolerance`` of its size) from the principal
    point is taken for such a resize and refused."""
    if recorded is not None:
        w0, h0 = int(recorded[0]), int(recorded[1])
        if (w0, h0) == (width, height):
            return K
        sx, sy = width / w0, height / h0
        if abs(sx / sy - 1) > 0.01:
            raise ValueError(f"{image}: image is {width}x{height}, its intrinsics are for {w0}x{h0} (export.json), "
                             "which is not a uniform resize of it; export the images at the recorded size")
        K = K.copy()
        K[0, 0], K[0, 2] = K[0, 0] * sx, (K[0, 2] + 0.5) * sx - 0.5
        K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
        return K
    cx, cy = float(K[0, 2]), float(K[1, 2])
    if abs(2 * cx + 1 - width) > centre_tolerance * width or abs(2 * cy + 1 - height) > centre_tolerance * height:
        raise ValueError(f"{image}: image is {width}x{height} but its intrinsics put the principal point at "
                         f"({cx:.1f}, {cy:.1f}), i.e. for an image of about {2 * cx + 1:.0f}x{2 * cy + 1:.0f}: were "
                         "the images resized after the intrinsics were written? Export them at that size (ScanNet: "
                         "the .sens through `harness data prepare`, whose export.json records the sizes) or "
                         "write intrinsics for this size")
    return K


def read_matrix(path: Path) -> np.ndarray:
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a matrix: {exc}") from exc
    if m.size == 16:
        return m.reshape(4, 4)
    if m.size == 12:
        return np.vstack([m.reshape(3, 4), [0, 0, 0, 1]])
    if m.size == 9:
        return m.reshape(3, 3)
    raise ValueError(f"{path}: expected a 3x3, 3x4 or 4x4 matrix, found {m.size} numbers")


def read_depth_png(path: Path, scale: float = 1000.0) -> np.ndarray:
    img = Image.open(path)
    raw = np.asarray(img)
    if raw.dtype not in (np.uint16, np.int32, np.uint32, np.int16):
        raise ValueError(f"{path}: depth PNG must be 16-bit, found mode {img.mode}")
    return raw.astype(np.float32) / scale


def write_depth_png(path: Path, depth_m: np.ndarray, scale: float = 1000.0) -> None:
    raw = np.clip(np.rint(depth_m * scale), 0, 65535).astype(np.uint16)
    Image.fromarray(raw).save(path)


def backproject(depth: np.ndarray, K: np.ndarray, stride: int = 1, max_depth: float = 0.0
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Camera-frame points (N,3) of the valid depth pixels and their (row, col) pixels (N,2)."""
    d = depth[::stride, ::stride]
    rows, cols = np.nonzero((d > 0) & ((d <= max_depth) if max_depth > 0 else True))
    z = d[rows, cols].astype(np.float64)
    rows, cols = rows * stride, cols * stride
    x = (cols - K[0, 2]) / K[0, 0] * z
    y = (rows - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, z], -1), np.stack([rows, cols], -1)


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ T[:3, :3].T + T[:3, 3]


def project(points_cam: np.ndarray, K: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u = column, v = row; continuous, pixel centres at integers) and depth."""
    z = points_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * points_cam[:, 0] / z + K[0, 2]
        v = K[1, 1] * points_cam[:, 1] / z + K[1, 2]
    return np.stack([u, v], -1), z


def visible(points_cam: np.ndarray, K: np.ndarray, width: int, height: int, depth: Optional[np.ndarray] = None,
            K_depth: Optional[np.ndarray] = None, tolerance: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """Which points project inside a ``width`` x ``height`` image and pass the depth test.

    Returns (mask, uv). The depth test compares each point's z with the depth map (in its own
    intrinsics ``K_depth``, default ``K``) at the nearest pixel: occluded points (farther than the
    measured surface by more than ``tolerance`` metres) and points on unmeasured pixels fail.
    """
    uv, z = project(points_cam, K)
    ok = (z > 1e-6) & (uv[:, 0] >= -0.5) & (uv[:, 0] < width - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < height - 0.5)
    if depth is not None:
        kd = K if K_depth is None else K_depth
        uvd, _ = project(points_cam, kd)
        hd, wd = depth.shape
        c = np.rint(uvd[:, 0]).astype(np.int64)
        r = np.rint(uvd[:, 1]).astype(np.int64)
        inside = ok & (c >= 0) & (c < wd) & (r >= 0) & (r < hd)
        measured = np.zeros(len(z))
        measured[inside] = depth[r[inside], c[inside]]
        ok = inside & (measured > 0) & (z <= measured + tolerance)
    return ok, uv


def sample_colors(points_cam: np.ndarray, color: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Colour of camera-frame points from the nearest colour pixel (outside the image: the nearest
    border pixel's, so that a colour camera a little narrower than the depth camera leaves no black rim)."""
    uv, _ = project(points_cam, K)
    h, w = color.shape[:2]
    c = np.clip(np.rint(uv[:, 0]), 0, w - 1).astype(np.int64)
    r = np.clip(np.rint(uv[:, 1]), 0, h - 1).astype(np.int64)
    return color[r, c]
