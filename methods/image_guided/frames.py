"""The RGB-D frames both stages read: every ``stride``-th frame of each training scene's recording.

The stride counts frames of the recording (``FrameRef.index``, the frame number the export keeps),
not exported files: with frames exported every 25th (the real-release default) a stride of 50
keeps every other export, and with an export every 30th it keeps frames 0, 60, 120, ... (the
first frames at least ``stride`` apart).
"""

from __future__ import annotations

import logging
from typing import Any, List

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def list_frames(dataset: Any, max_scenes: int = 0, stride: int = 1) -> List[Any]:
    """``FrameRef``s of the train split: per scene, frames at least ``stride`` recording frames apart.

    Pre-training never reads the validation split or any label.
    """
    if stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {stride}")
    if not hasattr(dataset, "frames"):
        raise ValueError(f"{type(dataset).__name__} offers no RGB-D frames; the image-guided method needs them")
    scenes = list(dataset.scenes("train"))
    if max_scenes:
        scenes = scenes[:max_scenes]
    refs: List[Any] = []
    for scene in scenes:
        refs += every_nth(list(dataset.frames(scene)), stride)
    if not refs:
        raise ValueError(f"no RGB-D frames in the train split of {type(dataset).__name__} "
                         f"({len(scenes)} scenes, frame_stride={stride})")
    log.info("frames.list scenes=%d frames=%d stride=%d", len(scenes), len(refs), stride)
    return refs


def every_nth(refs: List[Any], stride: int) -> List[Any]:
    """The first frame, then each next frame whose ``index`` is at least ``stride`` past the last kept."""
    kept: List[Any] = []
    for ref in sorted(refs, key=lambda r: r.index):
        if not kept or ref.index - kept[-1].index >= stride:
            kept.append(ref)
    return kept


def load_color(ref: Any) -> np.ndarray:
    """The colour image of a frame as (H, W, 3) uint8 (without reading its depth)."""
    try:
        return np.asarray(Image.open(ref.color_path).convert("RGB"))
    except OSError as exc:
        raise ValueError(f"{ref.color_path}: cannot read the colour image: {exc}") from exc
