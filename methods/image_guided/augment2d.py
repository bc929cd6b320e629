"""Stage-1 image augmentations that keep, for every output pixel, its source coordinates.

Pixel coordinates follow one convention throughout: ``(x, y)`` = (column, row), pixel centres at
integers, so an image of width W spans x in [-0.5, W - 0.5].

A view is a random resized crop (an integer box ``x0, y0, w, h`` of the source image, area
fraction in ``crop_scale``, aspect ratio in ``crop_ratio``) resized to ``crop_size`` with
bilinear interpolation (``align_corners=False``, antialiased), optionally mirrored left-right,
then colour-jittered. Output pixel (row i, column j) of the unmirrored view comes from source

    x = x0 + (j + 0.5) * w / W_out - 0.5,    y = y0 + (i + 0.5) * h / H_out - 0.5

(the sampling positions of the resize), and a mirrored view's column j is column
``W_out - 1 - j`` of the unmirrored one. Colour jitter moves no pixel. ``match_pixels`` pairs
the pixels of two views whose source coordinates lie within a radius (1.5 px in the recipe).

Every random draw comes from the explicit ``numpy.random.Generator`` given (the item's RNG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ViewAugmentConfig:
    # output size of each view, [width, height] (multiples of 32 for the ResUNet)
    crop_size: List[int] = field(default_factory=lambda: [224, 224])
    # area of the crop as a fraction of the image, uniform in [min, max]
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    # aspect ratio w/h of the crop, log-uniform in [min, max]
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    # probability of mirroring a view left-right
    flip_prob: float = 0.5
    # SimCLR-style colour jitter (strength 0.5): applied with probability jitter_prob
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    # probability of converting a view to grey
    grayscale_prob: float = 0.2


@dataclass
class CropBox:
    x0: int
    y0: int
    w: int
    h: int


def random_crop_box(rng: np.random.Generator, width: int, height: int, scale: Tuple[float, float],
                    ratio: Tuple[float, float]) -> CropBox:
    """A random resized crop's box (torchvision's rule: 10 tries, else the central crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return CropBox(x0, y0, w, h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return CropBox((width - w) // 2, (height - h) // 2, w, h)


def source_coords(box: CropBox, out_w: int, out_h: int, flip: bool) -> np.ndarray:
    """(out_h, out_w, 2) float64 source coordinates (x, y) of every pixel of the view."""
    x = box.x0 + (np.arange(out_w) + 0.5) * box.w / out_w - 0.5
    y = box.y0 + (np.arange(out_h) + 0.5) * box.h / out_h - 0.5
    if flip:
        x = x[::-1]
    xx, yy = np.meshgrid(x, y)
    return np.stack([xx, yy], -1)


def crop_resize(image: torch.Tensor, box: CropBox, out_w: int, out_h: int, flip: bool) -> torch.Tensor:
    """(3, H, W) float image -> (3, out_h, out_w) view, consistent with ``source_coords``."""
    crop = image[:, box.y0:box.y0 + box.h, box.x0:box.x0 + box.w]
    if (box.w, box.h) != (out_w, out_h):
        crop = F.interpolate(crop[None], size=(out_h, out_w), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    return crop.flip(-1) if flip else crop


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def color_jitter(rng: np.random.Generator, img: torch.Tensor, cfg: ViewAugmentConfig) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (random order), then random grey; [0, 1]."""
    out = img
    if rng.uniform() < cfg.jitter_prob:
        for op in rng.permutation(4):
            if op == 0 and cfg.brightness > 0:
                out = out * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
            elif op == 1 and cfg.contrast > 0:
                f = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
                out = (out - _gray(out).mean()) * f + _gray(out).mean()
            elif op == 2 and cfg.saturation > 0:
                f = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
                g = _gray(out)
                out = (out - g) * f + g
            elif op == 3 and cfg.hue > 0:
                out = _rotate_hue(out, rng.uniform(-cfg.hue, cfg.hue))
            out = out.clamp(0, 1)
    if rng.uniform() < cfg.grayscale_prob:
        out = _gray(out).expand(3, -1, -1)
    return out.clamp(0, 1).contiguous()


# RGB <-> YIQ: a hue shift is a rotation of the chroma plane (I, Q).
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)


def _rotate_hue(img: torch.Tensor, turn: float) -> torch.Tensor:
    a = 2 * math.pi * turn
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])
    m = (_YIQ_INV @ rot @ _YIQ).to(img.dtype)
    return torch.einsum("ij,jhw->ihw", m, img)


def augment_view(rng: np.random.Generator, image: torch.Tensor, cfg: ViewAugmentConfig
                 ) -> Tuple[torch.Tensor, np.ndarray]:
    """One augmented view of a (3, H, W) image in [0, 1] and its (out_h, out_w, 2) source coordinates."""
    _, height, width = image.shape
    out_w, out_h = int(cfg.crop_size[0]), int(cfg.crop_size[1])
    box = random_crop_box(rng, width, height, tuple(cfg.crop_scale), tuple(cfg.crop_ratio))
    flip = bool(rng.uniform() < cfg.flip_prob)
    view = crop_resize(image, box, out_w, out_h, flip)
    view = color_jitter(rng, view, cfg)
    return view, source_coords(box, out_w, out_h, flip)


def match_pixels(coords_a: np.ndarray, coords_b: np.ndarray, radius: float) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel pairs of two views whose source coordinates lie within ``radius`` pixels.

    For every pixel of view A (flat index, row-major), its nearest pixel of view B in source
    coordinates; the pairs farther apart than ``radius`` are dropped, and where several A pixels
    found the same B pixel (view A zoomed in further than B) only the nearest keeps it. Why: in
    the NT-Xent loss a B pixel listed twice is a negative identical to the positive of each of
    its copies. Returns (idx_a, idx_b), sorted by idx_a, each index at most once.
    """
    from scipy.spatial import cKDTree

    a = coords_a.reshape(-1, 2)
    b = coords_b.reshape(-1, 2)
    dist, nn_b = cKDTree(b).query(a, k=1, distance_upper_bound=np.nextafter(radius, np.inf))  # bound is strict
    idx_a = np.nonzero(np.isfinite(dist) & (dist <= radius))[0]
    order = np.lexsort((idx_a, dist[idx_a], nn_b[idx_a]))  # by B pixel, nearest (then lowest A) first
    first = np.unique(nn_b[idx_a[order]], return_index=True)[1]
    idx_a = np.sort(idx_a[order[first]])
    return idx_a.astype(np.int64), nn_b[idx_a].astype(np.int64)
