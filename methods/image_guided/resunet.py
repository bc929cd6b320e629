"""The 2D network of stage 1: a ResUNet (ResNet encoder, U-Net decoder) with a per-pixel head.

The encoder is a ResNet-18/34 written in plain PyTorch with torchvision's parameter names
(``conv1``, ``bn1``, ``layer1`` .. ``layer4``, blocks ``layerK.i.conv1/bn1/conv2/bn2`` and
``layerK.0.downsample.0/1``), so an ImageNet state dict saved from torchvision loads into it
unchanged (``load_encoder_weights``; torchvision itself is not a dependency).

The decoder follows Godard et al.'s depth decoder (the ResUNet the paper cites): five
upsampling stages, each a 3x3 conv block (reflection padding + ELU), nearest x2 upsampling,
concatenation with the encoder feature of that resolution and a second conv block; widths
16/32/64/128/256 from full to 1/16 resolution. The head is a 3x3 conv to ``feature_dim``
channels (16 in the paper) at the input resolution, L2-normalised per pixel.

Input: images (B, 3, H, W) with values in [0, 1], H and W multiples of 32 and at least 64; the network
normalises them with the ImageNet mean and standard deviation (the statistics of the encoder
weights).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# blocks per stage (torchvision's resnet18 / resnet34, BasicBlock)
RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
ENCODER_CHANNELS = (64, 64, 128, 256, 512)  # conv1 (1/2), layer1 (1/4), layer2 .. layer4 (1/32)
DECODER_CHANNELS = (16, 32, 64, 128, 256)  # decoder stage 0 (full resolution) .. 4 (1/16)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 32  # input sizes must be multiples of this


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet-18/34 without its classifier; returns the five feature maps the decoder uses."""

    def __init__(self, name: str = "resnet18"):
        super().__init__()
        if name not in RESNET_LAYERS:
            raise ValueError(f"encoder {name!r} is unknown; known: {', '.join(RESNET_LAYERS)}")
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 64
        blocks = RESNET_LAYERS[name]
        self.layer1 = self._make_layer(64, blocks[0], 1)
        self.layer2 = self._make_layer(128, blocks[1], 2)
        self.layer3 = self._make_layer(256, blocks[2], 2)
        self.layer4 = self._make_layer(512, blocks[3], 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f0, f1, f2, f3, f4]


class ConvBlock(nn.Module):
    """3x3 convolution with reflection padding, optional BatchNorm, then ELU (the depth decoder's block).

    The depth decoder has no normalisation; under a contrastive loss its activations grow
    without bound (ELU is linear for positive inputs) until a shared offset dominates every
    pixel and the normalised features collapse to one direction, so BatchNorm is on by default
    (``decoder_norm``)."""

    def __init__(self, cin: int, cout: int, norm: bool = True):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(cin, cout, 3, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pad(x))))


class UNetDecoder(nn.Module):
    """Upsampling path with skip connections; output at the input resolution, ``channels[0]`` wide."""

    def __init__(self, enc_channels: Sequence[int] = ENCODER_CHANNELS, channels: Sequence[int] = DECODER_CHANNELS,
                 norm: bool = True):
        super().__init__()
        self.channels = tuple(channels)
        for i in range(4, -1, -1):
            cin = enc_channels[4] if i == 4 else channels[i + 1]
            setattr(self, f"upconv{i}_0", ConvBlock(cin, channels[i], norm))
            skip = enc_channels[i - 1] if i > 0 else 0
            setattr(self, f"upconv{i}_1", ConvBlock(channels[i] + skip, channels[i], norm))

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x = feats[4]
        for i in range(4, -1, -1):
            x = getattr(self, f"upconv{i}_0")(x)
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            if i > 0:
                x = torch.cat([x, feats[i - 1]], 1)
            x = getattr(self, f"upconv{i}_1")(x)
        return x


class ResUNet(nn.Module):
    """Per-pixel L2-normalised features: (B, 3, H, W) in [0, 1] -> (B, feature_dim, H, W)."""

    def __init__(self, encoder: str = "resnet18", feature_dim: int = 16, decoder_norm: bool = True):
        super().__init__()
        self.encoder_name = encoder
        self.feature_dim = feature_dim
        self.decoder_norm = decoder_norm
        self.encoder = ResNetEncoder(encoder)
        self.decoder = UNetDecoder(norm=decoder_norm)
        self.head = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(DECODER_CHANNELS[0], feature_dim, 3))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h % STRIDE or w % STRIDE or h < 2 * STRIDE or w < 2 * STRIDE:
            raise ValueError(f"ResUNet input size {w}x{h} must be a multiple of {STRIDE} and at least "
                             f"{2 * STRIDE} in both dimensions")
        x = (images - self.mean) / self.std
        out = self.head(self.decoder(self.encoder(x)))
        return F.normalize(out, dim=1)

    def config(self) -> Dict[str, Any]:
        return {"encoder": self.encoder_name, "feature_dim": self.feature_dim, "decoder_norm": self.decoder_norm}


# ----------------------------------------------------------------------------------------------
# Weights


def load_encoder_weights(encoder: ResNetEncoder, path: str | Path) -> Dict[str, List[str]]:
    """Load a torchvision-format ResNet state dict (``.pth``/``.pt`` or ``.safetensors``) into ``encoder``.

    The classifier (``fc.*``) is skipped; every encoder tensor must be present with its shape and
    no other tensor may be there (a ResNet-34 file is not a ResNet-18 one), otherwise this raises naming the file and the tensors at fault (a partial load would
    silently turn "ImageNet-initialised" into "random").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"encoder_weights {path}: expected a state dict, found {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = encoder.state_dict()
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape))
    skipped = sorted(k for k in state if k not in own)
    unexpected = [k for k in skipped if not k.startswith("fc.")]  # e.g. a resnet34 file for resnet18
    if missing or wrong or unexpected:
        raise ValueError(f"encoder_weights {path} does not fit {encoder.name}: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, shape mismatch {wrong[:8]}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)
    log.info("resunet.encoder_weights loaded=%d skipped=%d file=%s", len(own), len(skipped), path)
    return {"loaded": sorted(own), "skipped": skipped}


def save_resunet(path: Path, net: ResUNet, extra: Optional[Dict[str, Any]] = None) -> Path:
    """The 2D network's weights (safetensors, with its architecture in the metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "image_guided.resunet", **net.config(), **(extra or {})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_resunet(path: Path) -> Tuple[ResUNet, Dict[str, Any]]:
    """A ``ResUNet`` rebuilt from a file written by ``save_resunet`` (strict load), and its meta."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"2D network {path} not found (stage 1 writes it into the pre-training workdir)")
    with safe_open(str(path), "pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    if meta.get("format") != "image_guided.resunet":
        raise ValueError(f"{path}: not an image-guided 2D network (metadata format {meta.get('format')!r})")
    net = ResUNet(meta["encoder"], int(meta["feature_dim"]), bool(meta.get("decoder_norm", True)))
    net.load_state_dict(load_file(str(path)), strict=True)
    return net, meta
