"""Stage 1: pixel-level SimCLR on single RGB frames, training the ResUNet.

Per image two augmented views (random resized crop, flip, colour jitter) with every output
pixel's source coordinates; positives are pixel pairs of the two views whose source coordinates
lie within ``match_radius`` (1.5 px); up to ``pixels_per_image`` (4092) pairs are sampled per
image; SimCLR's symmetric loss (NT-Xent) at tau 0.4: each pixel of both views is an anchor,
its match in the other view the positive, every other sampled pixel of the (global) batch, of
either view and other images, a negative. SGD (lr 0.01, momentum 0.9, dampening 0.1, wd 1e-4), lr x0.99 every 1000
steps, the encoder frozen for the first ``freeze_encoder_steps`` (50) steps.

Runs through the shared ``Trainer`` under the name ``stage1`` (checkpoint ``ckpt/stage1-last.pt``,
log ``metrics-stage1.jsonl``), so it resumes like any other training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from harness.config import OptimizerConfig, ScheduleConfig
from harness.train import BatchStream, TrainResult, Trainer

from .augment2d import ViewAugmentConfig, augment_view, match_pixels
from .frames import load_color
from .losses import pixel_info_nce
from .resunet import ResUNet, load_encoder_weights

log = logging.getLogger(__name__)


@dataclass
class Stage1Config:
    steps: int = 40000
    batch_size: int = 64
    # every n-th frame of each recording (FrameRef.index gaps, not exported files; see frames.py)
    frame_stride: int = 50
    # ResNet encoder of the ResUNet: resnet18 | resnet34
    encoder: str = "resnet18"
    # torchvision-format ImageNet weights for the encoder (.pth or .safetensors); null = random init
    encoder_weights: Optional[str] = None
    feature_dim: int = 16
    # BatchNorm in the decoder's conv blocks (without it the features collapse, see resunet.ConvBlock)
    decoder_norm: bool = True
    # encoder parameters are not updated for the first n steps
    freeze_encoder_steps: int = 50
    pixels_per_image: int = 4092
    # positives: pixels whose source coordinates lie within this many source pixels
    match_radius: float = 1.5
    tau: float = 0.4
    # InfoNCE rows computed at a time (with recomputation in backward); 0 = all at once
    loss_chunk: int = 2048
    view: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name="sgd", lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-4))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="step", gamma=0.99, step_size=1000))


def image_tensor(color: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(color, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def make_pair(image: torch.Tensor, rng: np.random.Generator, cfg: Any) -> Dict[str, Any]:
    """Two views of one image and the sampled positive pixel pairs (flat indices into each view)."""
    view_a, coords_a = augment_view(rng, image, cfg.view)
    view_b, coords_b = augment_view(rng, image, cfg.view)
    idx_a, idx_b = match_pixels(coords_a, coords_b, cfg.match_radius)
    if len(idx_a) > cfg.pixels_per_image:
        pick = np.sort(rng.choice(len(idx_a), cfg.pixels_per_image, replace=False))
        idx_a, idx_b = idx_a[pick], idx_b[pick]
    return {"view_a": view_a, "view_b": view_b, "idx_a": idx_a, "idx_b": idx_b,
            "coords_a": coords_a, "coords_b": coords_b}


def collate_pairs(pairs: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Views stacked (B, 3, H, W); pair indices made global over the batch (b * H * W + pixel)."""
    h, w = pairs[0]["view_a"].shape[-2:]
    offsets = [b * h * w for b in range(len(pairs))]
    return {
        "view_a": torch.stack([p["view_a"] for p in pairs]),
        "view_b": torch.stack([p["view_b"] for p in pairs]),
        "idx_a": torch.from_numpy(np.concatenate([p["idx_a"] + o for p, o in zip(pairs, offsets)])),
        "idx_b": torch.from_numpy(np.concatenate([p["idx_b"] + o for p, o in zip(pairs, offsets)])),
    }


class Stage1Model(nn.Module):
    """The ResUNet and the pixel InfoNCE; ``forward(batch)`` returns the loss dict."""

    def __init__(self, net: ResUNet, tau: float, loss_chunk: int = 0):
        super().__init__()
        self.net = net
        self.tau = tau
        self.loss_chunk = loss_chunk

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        va, vb = batch["view_a"], batch["view_b"]
        b, _, h, w = va.shape
        feats = self.net(torch.cat([va, vb], 0))  # (2B, D, H, W), unit vectors
        flat = feats.permute(0, 2, 3, 1).reshape(2, b * h * w, -1)
        za = flat[0].index_select(0, batch["idx_a"])
        zb = flat[1].index_select(0, batch["idx_b"])
        loss = pixel_info_nce(za, zb, self.tau, self.loss_chunk)
        pos_sim = (za * zb).sum(1).mean() if len(za) else loss.detach() * 0
        return {"loss": loss, "pos_sim": pos_sim.detach(), "pairs": float(len(za))}


def build_net(cfg: Any, seed: int) -> ResUNet:
    torch.manual_seed(seed)
    net = ResUNet(cfg.encoder, cfg.feature_dim, cfg.decoder_norm)
    if cfg.encoder_weights:
        load_encoder_weights(net.encoder, cfg.encoder_weights)
    else:
        log.warning("stage1.encoder init=random: no encoder_weights given (the paper starts the encoder from "
                    "ImageNet weights; set stage1.encoder_weights to a torchvision ResNet file)")
    return net


def freeze_encoder_hook(trainer: Trainer, encoder: nn.Module, steps: int) -> Any:
    """Drop the encoder's gradients before each optimiser step while ``trainer.step < steps``.

    The encoder still runs (and its gradient is computed, so DDP sees every parameter used),
    but with ``grad = None`` SGD leaves it untouched: no update, no weight decay, no momentum.
    ``trainer.step`` is restored on resumption, so a resumed run freezes the same steps.
    """
    params = list(encoder.parameters())

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if trainer.step < steps:
            for p in params:
                p.grad = None

    return trainer.optimizer.register_step_pre_hook(hook)


def run_stage1(ctx: Any, cfg: Any, frames: List[Any]) -> Tuple[ResUNet, TrainResult]:
    """Train the ResUNet on ``frames`` (FrameRefs) with the shared Trainer (name ``stage1``)."""
    net = build_net(cfg, ctx.seed)
    model = Stage1Model(net, cfg.tau, cfg.loss_chunk)

    def make_batch(items: List[tuple], rngs: List[np.random.Generator]) -> Dict[str, Any]:
        pairs = [make_pair(image_tensor(load_color(frames[i])), rng, cfg) for (i, _), rng in zip(items, rngs)]
        return collate_pairs(pairs)

    stream = BatchStream(len(frames), cfg.batch_size, ctx.seed, make_batch)
    trainer = Trainer(model, stream, cfg.steps, cfg.optimizer, cfg.schedule, ctx.workdir, ctx.device, ctx.trainer,
                      name="stage1", progress=ctx.progress)
    freeze_encoder_hook(trainer, net.encoder, cfg.freeze_encoder_steps)
    result = trainer.fit()
    return net, result
