"""Res16UNet (BasicBlock variants), written once over a backend's layer factory.

Parameter names, shapes, kernel-offset order and initialisation are those of the public
MinkowskiEngine-0.5.4 Res16UNet34C used by PointContrast and CSC, so one state_dict runs on
either backend and their checkpoints load. The layer factories are
:class:`~.torch_backend.TorchOps` and :class:`~.minkowski.MinkowskiOps`.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["BasicBlock", "Res16UNet"]


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions with BatchNorm and a residual; names as in the public code."""

    expansion = 1

    def __init__(self, ops, inplanes: int, planes: int, downsample: Optional[nn.Module] = None,
                 bn_momentum: float = 0.1):
        super().__init__()
        self._ops = ops
        self.conv1 = ops.conv(inplanes, planes, kernel_size=3, stride=1)
        self.norm1 = ops.bn(planes, momentum=bn_momentum)
        self.conv2 = ops.conv(planes, planes, kernel_size=3, stride=1)
        self.norm2 = ops.bn(planes, momentum=bn_momentum)
        self.relu = ops.relu()
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(self._ops.add_(out, residual))


class Res16UNet(nn.Module):
    """Sparse residual U-Net with four stride-2 levels (MinkowskiEngine's Res16UNet family).

    ``forward(coords, feats)``: int32 coordinates (N, 4) (batch index, x, y, z in voxel units,
    each site once) and float features (N, in_channels) -> (N, out_channels) for the same
    sites in the same row order. ``forward_features`` returns the (N, planes[7]) features
    before ``final``; ``final`` may be replaced by any module (a sparse module of the backend
    runs on the sparse tensor, anything else on the (N, planes[7]) features).
    """

    INIT_DIM = 32

    def __init__(self, ops, name: str, layers: Sequence[int], planes: Sequence[int], in_channels: int,
                 out_channels: int, bn_momentum: Optional[float] = None, conv1_kernel_size: int = 3):
        super().__init__()
        layers, planes = tuple(int(v) for v in layers), tuple(int(v) for v in planes)
        if len(layers) != 8 or len(planes) != 8 or min(layers) < 1 or min(planes) < 1:
            raise ValueError(f"{name}: layers and planes need 8 positive entries, got layers={layers} planes={planes}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"{name}: in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        self._ops = ops
        self.name, self.layers, self.planes = name, layers, planes
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.backend = ops.name
        m = 0.1 if bn_momentum is None else float(bn_momentum)
        self.bn_momentum = m
        conv, bn = ops.conv, ops.bn

        self.inplanes = self.INIT_DIM
        self.conv0p1s1 = conv(in_channels, self.inplanes, kernel_size=conv1_kernel_size, stride=1)
        self.bn0 = bn(self.inplanes, momentum=m)
        self.conv1p1s2 = conv(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn1 = bn(self.inplanes, momentum=m)
        self.block1 = self._make_layer(planes[0], layers[0])
        self.conv2p2s2 = conv(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn2 = bn(self.inplanes, momentum=m)
        self.block2 = self._make_layer(planes[1], layers[1])
        self.conv3p4s2 = conv(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn3 = bn(self.inplanes, momentum=m)
        self.block3 = self._make_layer(planes[2], layers[2])
        self.conv4p8s2 = conv(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn4 = bn(self.inplanes, momentum=m)
        self.block4 = self._make_layer(planes[3], layers[3])

        self.convtr4p16s2 = ops.conv_tr(self.inplanes, planes[4], kernel_size=2, stride=2)
        self.bntr4 = bn(planes[4], momentum=m)
        self.inplanes = planes[4] + planes[2]
        self.block5 = self._make_layer(planes[4], layers[4])
        self.convtr5p8s2 = ops.conv_tr(self.inplanes, planes[5], kernel_size=2, stride=2)
        self.bntr5 = bn(planes[5], momentum=m)
        self.inplanes = planes[5] + planes[1]
        self.block6 = self._make_layer(planes[5], layers[5])
        self.convtr6p4s2 = ops.conv_tr(self.inplanes, planes[6], kernel_size=2, stride=2)
        self.bntr6 = bn(planes[6], momentum=m)
        self.inplanes = planes[6] + planes[0]
        self.block7 = self._make_layer(planes[6], layers[6])
        self.convtr7p2s2 = ops.conv_tr(self.inplanes, planes[7], kernel_size=2, stride=2)
        self.bntr7 = bn(planes[7], momentum=m)
        self.inplanes = planes[7] + self.INIT_DIM
        self.block8 = self._make_layer(planes[7], layers[7])

        self.final = conv(planes[7], out_channels, kernel_size=1, stride=1, bias=True)
        self.relu = ops.relu()
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = None
        if self.inplanes != planes * BasicBlock.expansion:
            # Blocks keep PyTorch's default BatchNorm momentum, as in the public code.
            downsample = nn.Sequential(
                self._ops.conv(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=1),
                self._ops.bn(planes * BasicBlock.expansion, momentum=0.1),
            )
        mods = [BasicBlock(self._ops, self.inplanes, planes, downsample=downsample)]
        self.inplanes = planes * BasicBlock.expansion
        mods += [BasicBlock(self._ops, self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        """Kaiming-normal (fan_out, relu) on every kernel, fans as MinkowskiEngine counts them:
        a (K, in, out) kernel has fan_out = K * out, a 2-D (in, out) one fan_out = in."""
        gain = 2.0 ** 0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(".kernel"):
                    fan_out = p.shape[0] * p.shape[2] if p.dim() == 3 else p.shape[0]
                    p.normal_(0.0, gain / fan_out ** 0.5)
            for mod in self.modules():
                if isinstance(mod, nn.BatchNorm1d):
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()

    # -- forward --------------------------------------------------------------------------------
    def _trunk(self, x):
        relu = self.relu
        out_p1 = relu(self.bn0(self.conv0p1s1(x)))
        out_b1p2 = self.block1(relu(self.bn1(self.conv1p1s2(out_p1))))
        out_b2p4 = self.block2(relu(self.bn2(self.conv2p2s2(out_b1p2))))
        out_b3p8 = self.block3(relu(self.bn3(self.conv3p4s2(out_b2p4))))
        out = self.block4(relu(self.bn4(self.conv4p8s2(out_b3p8))))
        out = relu(self.bntr4(self.convtr4p16s2(out)))
        out = self.block5(self._ops.cat(out, out_b3p8))
        out = relu(self.bntr5(self.convtr5p8s2(out)))
        out = self.block6(self._ops.cat(out, out_b2p4))
        out = relu(self.bntr6(self.convtr6p4s2(out)))
        out = self.block7(self._ops.cat(out, out_b1p2))
        out = relu(self.bntr7(self.convtr7p2s2(out)))
        return self.block8(self._ops.cat(out, out_p1))

    def _begin(self, coords: torch.Tensor, feats: torch.Tensor):
        """The backend's sparse input and its context; this forward counts as one batch for the norms."""
        x, ctx = self._ops.wrap(coords, feats, self.in_channels, self.level_widths())
        self._ops.count_batches(self)
        return x, ctx

    def forward_features(self, coords: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """(N, planes[7]) features before ``final``, rows in input order."""
        x, ctx = self._begin(coords, feats)
        return self._ops.unwrap(self._trunk(x), ctx)

    def forward(self, coords: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        x, ctx = self._begin(coords, feats)
        out = self._trunk(x)
        if self._ops.is_sparse_module(self.final):
            return self._ops.unwrap(self.final(out), ctx)
        return self.final(self._ops.unwrap(out, ctx))

    def level_widths(self) -> Dict[int, int]:
        """Tensor stride -> the widest channel count of the 3x3x3 layers at that stride."""
        p = self.planes
        return {1: p[7], 2: max(p[0], p[6]), 4: max(p[1], p[5]), 8: max(p[2], p[4]), 16: p[3]}

    def extra_repr(self) -> str:
        return f"name={self.name}, backend={self.backend}, layers={self.layers}, planes={self.planes}"

    def architecture(self) -> Tuple[str, Tuple[int, ...], Tuple[int, ...]]:
        return self.name, self.layers, self.planes
