"""The torch backend's sparse tensor, and the input checks shared by every backend."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .kernel_map import CoordinateManager

__all__ = ["SparseTensor", "check_input"]


def check_input(coords, feats, in_channels: Optional[int] = None) -> None:
    """Raise ValueError unless ``coords`` (N, 4) integer and ``feats`` (N, in_channels) float
    tensors describe a non-empty batch on one device."""
    if not isinstance(coords, torch.Tensor) or not isinstance(feats, torch.Tensor):
        raise ValueError(f"coords and feats must be torch tensors, got {type(coords).__name__} and "
                         f"{type(feats).__name__}")
    if coords.is_floating_point() or coords.is_complex() or coords.dtype == torch.bool:
        raise ValueError(f"coords must be integer voxel coordinates (int32), got {coords.dtype}; "
                         "voxelize the points first (harness.backbones.voxelize)")
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must have shape (N, 4) = (batch index, x, y, z), got {tuple(coords.shape)}")
    if feats.ndim != 2:
        raise ValueError(f"feats must have shape (N, C), got {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise ValueError(f"feats must be floating point, got {feats.dtype}")
    if coords.shape[0] != feats.shape[0]:
        raise ValueError(f"coords has {coords.shape[0]} rows but feats has {feats.shape[0]}")
    if coords.shape[0] == 0:
        raise ValueError("empty batch: coords and feats have no rows")
    if in_channels is not None and feats.shape[1] != in_channels:
        raise ValueError(f"feats has {feats.shape[1]} channels but the backbone expects in_channels={in_channels}")
    if coords.device != feats.device:
        raise ValueError(f"coords are on {coords.device} but feats on {feats.device}")
    if int(coords[:, 0].min()) < 0:
        raise ValueError("coords[:, 0] is the batch index and must be >= 0")


class SparseTensor:
    """Features on the sites of one coordinate set.

    ``F`` (N, C) features, ``stride`` the tensor stride, ``manager`` the
    :class:`~.kernel_map.CoordinateManager` that owns the coordinate sets and kernel maps of
    this forward pass; ``C`` gives the (N, 4) int32 coordinates of the rows of ``F``.

    Built from user coordinates (``SparseTensor(feats, coords)``) the rows keep the input
    order; with ``reorder=True`` the manager may permute them for speed, and
    :meth:`input_order` restores the input order of stride-1 features.
    """

    __slots__ = ("F", "stride", "manager")

    def __init__(self, feats: torch.Tensor, coords: Optional[torch.Tensor] = None, stride: int = 1,
                 manager: Optional[CoordinateManager] = None, reorder: bool = False,
                 widths: Optional[Dict[int, int]] = None):
        if manager is None:
            if coords is None:
                raise ValueError("SparseTensor needs coords or a manager")
            check_input(coords, feats)
            manager = CoordinateManager(coords, reorder=reorder, widths=widths, stride=stride)
            feats = manager.to_internal(feats)
        self.F = feats
        self.stride = int(stride)
        self.manager = manager

    @property
    def C(self) -> torch.Tensor:
        return self.manager.level(self.stride).coords_tensor()

    @property
    def tensor_stride(self) -> int:
        return self.stride

    def replace(self, feats: torch.Tensor, stride: Optional[int] = None) -> "SparseTensor":
        return SparseTensor(feats, stride=self.stride if stride is None else stride, manager=self.manager)

    def input_order(self) -> torch.Tensor:
        if self.stride != self.manager.base_stride:
            raise ValueError(f"input order exists only at the input's stride {self.manager.base_stride}, "
                             f"this tensor has stride {self.stride}")
        return self.manager.to_input_order(self.F)

    def _same_sites(self, other: "SparseTensor") -> None:
        if other.manager is not self.manager or other.stride != self.stride:
            raise ValueError("sparse tensors live on different coordinate sets")

    def __add__(self, other: "SparseTensor") -> "SparseTensor":
        self._same_sites(other)
        return self.replace(self.F + other.F)

    def __repr__(self) -> str:
        return f"SparseTensor(n={self.F.shape[0]}, channels={self.F.shape[1]}, stride={self.stride})"
