"""Pure-PyTorch backend: layers with MinkowskiEngine's parameter names and shapes."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm
from .ops import sparse_conv
from .sparse import SparseTensor, check_input
from .workers import restore_caller_threads

__all__ = ["SparseConv", "SparseConvTranspose", "SparseBatchNorm", "SparseReLU", "TorchOps"]


class SparseConv(nn.Module):
    """ME's MinkowskiConvolution for the kernels Res16UNet uses.

    kernel 3, stride 1: output sites = input sites; kernel 2, stride 2: output sites = input
    sites floored to twice the stride; kernel 1: a per-site linear map. ``kernel`` has shape
    (kernel_volume, in, out), or (in, out) for kernel 1; ``bias`` (1, out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = False, dimension: int = 3):
        super().__init__()
        if dimension != 3:
            raise ValueError(f"only 3-D sparse convolutions are supported, got dimension={dimension}")
        if (kernel_size, stride) not in ((3, 1), (2, 2), (1, 1)):
            raise ValueError(f"unsupported kernel_size={kernel_size}, stride={stride}: the torch backend "
                             "implements (3, 1), (2, 2) and (1, 1)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        kv = kernel_size ** 3
        shape = (kv, in_channels, out_channels) if kv > 1 else (in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(1, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, is_transpose: bool = False) -> None:
        n = (self.out_channels if is_transpose else self.in_channels) * self.kernel_size ** 3
        stdv = 1.0 / math.sqrt(n)
        with torch.no_grad():
            self.kernel.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.uniform_(-stdv, stdv)

    def _linear(self, f: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return torch.addmm(self.bias, f, self.kernel)
        return f @ self.kernel

    def forward(self, x):
        if isinstance(x, torch.Tensor):  # a 1x1 conv also applies to plain (N, C) features
            if self.kernel_size != 1:
                raise ValueError("only a kernel-1 convolution applies to a plain feature tensor")
            return self._linear(x)
        if self.kernel_size == 1:
            return x.replace(self._linear(x.F))
        if self.kernel_size == 3:
            plan = x.manager.level(x.stride).plan
            out = sparse_conv(x.F, self.kernel, plan, None, "out")
            stride = x.stride
        else:
            dm = x.manager.down_map(x.stride)
            out = sparse_conv(x.F, self.kernel, dm.down, dm.up, "out")
            stride = 2 * x.stride
        if self.bias is not None:
            out = out + self.bias
        return x.replace(out, stride)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, bias={self.bias is not None}")


class SparseConvTranspose(SparseConv):
    """ME's MinkowskiConvolutionTranspose, kernel 2 stride 2: back onto the finer site set that
    was recorded on the way down; fine site p gets ``x[parent(p)] @ kernel[offset(p)]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 bias: bool = False, dimension: int = 3):
        if (kernel_size, stride) != (2, 2):
            raise ValueError(f"unsupported transposed kernel_size={kernel_size}, stride={stride}; only (2, 2)")
        super().__init__(in_channels, out_channels, kernel_size, stride, bias, dimension)

    def reset_parameters(self, is_transpose: bool = True) -> None:
        super().reset_parameters(is_transpose=True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        fine = x.stride // 2
        if x.stride < 2 or fine not in x.manager.down_maps:
            raise ValueError(f"transposed convolution from stride {x.stride}: no finer coordinate set was "
                             "recorded on the way down")
        dm = x.manager.down_maps[fine]
        out = sparse_conv(x.F, self.kernel, dm.up, dm.down, "in")
        if self.bias is not None:
            out = out + self.bias
        return x.replace(out, fine)


class SparseBatchNorm(nn.Module):
    """BatchNorm over the active sites; the inner ``bn`` matches ME's MinkowskiBatchNorm.

    Inside a network whose forward counts its batches in one op (:meth:`TorchOps.count_batches`),
    a plain ``nn.BatchNorm1d`` with a fixed momentum runs as ``F.batch_norm`` directly: its own
    forward would add 1 to ``num_batches_tracked`` in a separate launch on a GPU, 62 per
    Res16UNet34C step. Any other ``bn`` (a synchronised one, momentum None) runs as itself."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)
        self.counted_outside = False  # set by TorchOps.count_batches

    def counts_outside(self) -> bool:
        bn = self.bn
        return type(bn) is nn.BatchNorm1d and bn.momentum is not None and bn.track_running_stats

    def forward(self, x: SparseTensor) -> SparseTensor:
        bn = self.bn
        if self.counted_outside and self.counts_outside():
            return x.replace(F.batch_norm(x.F, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training,
                                          bn.momentum, bn.eps))
        return x.replace(bn(x.F))


class SparseReLU(nn.Module):
    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(torch.relu_(x.F) if self.inplace else torch.relu(x.F))


class TorchOps:
    """Layer factory and tensor plumbing of the torch backend (see res16unet.Res16UNet)."""

    name = "torch"

    @staticmethod
    def conv(in_channels, out_channels, kernel_size, stride=1, bias=False):
        return SparseConv(in_channels, out_channels, kernel_size, stride, bias)

    @staticmethod
    def conv_tr(in_channels, out_channels, kernel_size, stride):
        return SparseConvTranspose(in_channels, out_channels, kernel_size, stride)

    @staticmethod
    def bn(num_features, momentum=0.1):
        return SparseBatchNorm(num_features, momentum=momentum)

    @staticmethod
    def relu():
        return SparseReLU(inplace=True)

    @staticmethod
    def cat(a: SparseTensor, b: SparseTensor) -> SparseTensor:
        a._same_sites(b)
        return a.replace(torch.cat([a.F, b.F], dim=1))

    @staticmethod
    def add_(out: SparseTensor, residual: SparseTensor) -> SparseTensor:
        """``out + residual``, written into ``out``'s features (a layer output nobody else holds)."""
        out._same_sites(residual)
        return out.replace(out.F.add_(residual.F))

    @staticmethod
    def count_batches(model: nn.Module) -> None:
        """Add this forward's 1 to every training batch norm's ``num_batches_tracked`` in one op,
        as each ``nn.BatchNorm1d`` would in its own forward (see :class:`SparseBatchNorm`)."""
        bns = model.__dict__.get("_counted_batch_norms")
        if bns is None:
            bns = [m for m in model.modules() if isinstance(m, SparseBatchNorm)]
            for m in bns:
                m.counted_outside = True
            model.__dict__["_counted_batch_norms"] = bns
        counters = [m.bn.num_batches_tracked for m in bns if m.bn.training and m.counts_outside()]
        if counters:
            torch._foreach_add_(counters, 1)

    @staticmethod
    def is_sparse_module(m: nn.Module) -> bool:
        return isinstance(m, (SparseConv, SparseBatchNorm, SparseReLU))

    @staticmethod
    def wrap(coords: torch.Tensor, feats: torch.Tensor, in_channels: int,
             widths: Optional[Dict[int, int]] = None) -> Tuple[SparseTensor, None]:
        check_input(coords, feats, in_channels)
        if feats.device.type == "cpu":
            gemm.backend()  # chosen (timed) here, on the calling thread, before any worker needs it
        x = SparseTensor(feats, coords, reorder=True, widths=widths)
        if widths:
            # Every coordinate set the network uses, before its first layer: on a GPU building
            # one waits for the device (output sizes), so built mid-forward each set emptied the
            # queue and left the GPU idle while the host caught up (H100, 100k voxels, steps
            # alternating in one process: fp32 66.3 ms, was 68.6; TF32 47.6, was 49.9).
            x.manager.level(max(widths))
        return x, None

    @staticmethod
    def unwrap(x: SparseTensor, ctx) -> torch.Tensor:
        restore_caller_threads()  # a forward that ended on a small set (see workers.caller_threads_for)
        return x.input_order()
