"""MinkowskiEngine 0.5.4 backend: the same network built from ME's own modules.

Importing this module imports MinkowskiEngine; ``harness.backbones`` only does so when the
``minkowski`` backend is asked for (or ``auto`` finds ME installed).
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .sparse import check_input

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ME warns about OpenMP thread settings on import
    import MinkowskiEngine as ME

__all__ = ["MinkowskiOps", "ME"]


def _check_unique(coords: torch.Tensor) -> None:
    """ME would silently merge duplicate sites; refuse them like the torch backend does."""
    c = coords.to(torch.int64)
    lo = c.min(dim=0).values
    ext = (c.max(dim=0).values - lo + 1).tolist()
    s = c - lo
    keys = ((s[:, 0] * ext[1] + s[:, 1]) * ext[2] + s[:, 2]) * ext[3] + s[:, 3]
    sk, order = torch.sort(keys)
    dup = sk[1:] == sk[:-1]
    if bool(dup.any()):
        row = int(order[1:][dup][0])
        raise ValueError(f"duplicate coordinate {coords[row].tolist()} (row {row}); sites must be unique "
                         "(voxelize the points first)")


class MinkowskiOps:
    """Layer factory and tensor plumbing on MinkowskiEngine (see res16unet.Res16UNet)."""

    name = "minkowski"

    @staticmethod
    def conv(in_channels, out_channels, kernel_size, stride=1, bias=False):
        return ME.MinkowskiConvolution(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                                       dilation=1, bias=bias, dimension=3)

    @staticmethod
    def conv_tr(in_channels, out_channels, kernel_size, stride):
        return ME.MinkowskiConvolutionTranspose(in_channels, out_channels, kernel_size=kernel_size,
                                                stride=stride, dilation=1, bias=False, dimension=3)

    @staticmethod
    def bn(num_features, momentum=0.1):
        return ME.MinkowskiBatchNorm(num_features, momentum=momentum)

    @staticmethod
    def relu():
        return ME.MinkowskiReLU(inplace=True)

    @staticmethod
    def cat(a, b):
        return ME.cat(a, b)

    @staticmethod
    def add_(out, residual):
        out += residual
        return out

    @staticmethod
    def count_batches(model: nn.Module) -> None:
        """Nothing: ME's batch norms count their own batches."""

    @staticmethod
    def is_sparse_module(m: nn.Module) -> bool:
        return isinstance(m, ME.MinkowskiModuleBase)

    @staticmethod
    def wrap(coords: torch.Tensor, feats: torch.Tensor, in_channels: int,
             widths: Optional[Dict[int, int]] = None) -> Tuple["ME.SparseTensor", torch.Tensor]:
        check_input(coords, feats, in_channels)
        _check_unique(coords)
        x = ME.SparseTensor(feats, coords.to(torch.int32),
                            quantization_mode=ME.SparseTensorQuantizationMode.RANDOM_SUBSAMPLE)
        # ME keeps unique coordinates in its own row order; row i of the input is row
        # inverse_mapping[i] of every stride-1 tensor of this forward pass.
        return x, x.inverse_mapping.long()

    @staticmethod
    def unwrap(x, inverse: torch.Tensor) -> torch.Tensor:
        return x.F.index_select(0, inverse.to(x.F.device))
