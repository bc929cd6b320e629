"""The interfaces every plugin implements: methods, datasets and tasks.

Torch-free on purpose: the registry checks plugins against these classes at registration,
and the CLI lists plugins and validates sweeps without loading a model.

- A ``Method`` pre-trains a backbone and exports it in the canonical checkpoint format
  (``harness.backbones.checkpoint``); it declares the data it consumes and its report group.
- A ``Dataset`` reads one release (its official layout) into plain arrays.
- A ``Task`` fine-tunes a backbone checkpoint on a dataset and returns its metrics.

Each plugin class carries a ``Config`` dataclass: the schema of its YAML file under
``configs/`` (unknown keys and wrong types fail at load, naming the file and key).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

# What a method may consume, from the pre-training dataset.
CONSUMES = ("scenes", "frames", "frame_pairs")
# Row groups of Table 1, in report order.
GROUPS = ("Scratch", "Multi-scan", "Single-scan")


@dataclass
class MethodConfig:
    """Fields every method YAML has; a method subclasses this with its own hyper-parameters."""

    method: str = "???"
    version: str = "1"


class Method(abc.ABC):
    """A pre-training method: ``pretrain(ctx)`` trains and returns the exported checkpoint path."""

    group: ClassVar[str] = "Single-scan"
    consumes: ClassVar[Tuple[str, ...]] = ("scenes",)
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = MethodConfig

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abc.abstractmethod
    def pretrain(self, ctx: Any) -> Path:
        """Train on ``ctx``'s pre-training data and return the path of the exported checkpoint."""

    @abc.abstractmethod
    def export(self, path: Path, ctx: Any) -> Path:
        """Write the backbone weights (canonical format) to ``path`` and return it."""

    @classmethod
    def fingerprint(cls, cfg: Any) -> str:
        """What the result depends on besides the config ("" = nothing): e.g. the bytes of a file
        the config names, so that a new file under the same path is not taken as done."""
        return ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.group not in GROUPS:
            raise TypeError(f"{cls.__qualname__}.group must be one of {GROUPS}, got {cls.group!r}")
        bad = [c for c in cls.consumes if c not in CONSUMES]
        if bad:
            raise TypeError(f"{cls.__qualname__}.consumes has unknown kinds {bad}; known: {CONSUMES}")


@dataclass
class DatasetConfig:
    """Fields every dataset YAML has."""

    dataset: str = "???"
    # Directory of the release in its official layout; null = the embedded miniature,
    # generated on first use into the cache directory.
    root: Optional[str] = None
    cache_dir: str = "${oc.env:HARNESS_CACHE,.cache}"


class Dataset(abc.ABC):
    """One dataset release, read from its official on-disk layout into plain numpy arrays."""

    Config: ClassVar[type] = DatasetConfig
    # Tasks of Table 1 this dataset has labels for.
    tasks: ClassVar[Tuple[str, ...]] = ()
    # Whether it offers RGB-D frames (pre-training methods that consume frames need them).
    has_frames: ClassVar[bool] = False
    # IoU of a class that an evaluated split lacks in gt and predictions, as the dataset's
    # official evaluator scores it: "nan" (left out of the mIoU) or "zero" (see harness.metrics.semantic).
    absent_class_iou: ClassVar[str] = "nan"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abc.abstractmethod
    def scenes(self, split: str) -> List[str]:
        """Scene (or scan) identifiers of a split ('train' or 'val')."""

    @abc.abstractmethod
    def load(self, scene: str) -> Dict[str, Any]:
        """Arrays of one scene: at least ``points`` (N,3) float32 and ``colors`` (N,3) uint8."""


@dataclass
class TaskConfig:
    """Fields every task YAML has."""

    task: str = "???"
    version: str = "1"


class Task(abc.ABC):
    """A downstream task: fine-tune a backbone on a dataset and evaluate it."""

    Config: ClassVar[type] = TaskConfig
    # Name of the metric reported in Table 1 and its display scale (x100 for percentages).
    metric: ClassVar[str] = "???"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abc.abstractmethod
    def run(self, ctx: Any) -> Dict[str, Any]:
        """Fine-tune and evaluate; return a dict with at least ``self.metric``."""
