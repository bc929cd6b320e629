"""The torch backend on a GPU (skipped without CUDA; `scripts/gpu_check.sh` runs it on a lent GPU).

On CUDA every coordinate set runs as a table plan (one gather and one GEMM per convolution); on
the CPU the fine sets run in buckets with spilled offsets, on worker threads. Same state_dict, same input:
the two must give the same outputs and gradients (float64: to rounding)."""

import copy

import pytest
import torch

from harness.backbones import build_backbone, kernel_map
from harness.backbones.kernel_map import CoordinateManager, TablePlan
from harness.backbones.synthetic import room_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a, b):
    """max |a - b| / max |b|"""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _step(model, coords, feats, device, g):
    model.zero_grad(set_to_none=True)
    f = feats.to(device).clone().requires_grad_()
    out = model(coords.to(device), f)
    (out * g.to(device)).sum().backward()
    return out.detach(), f.grad.detach(), {k: p.grad.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_res16unet34c_on_cuda_equals_the_cpu_float64(mode, monkeypatch):
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 1000)  # the CPU's fine sets in buckets
    coords, colors = room_batch(4000, seed=5)
    coords, feats = torch.from_numpy(coords), torch.from_numpy(colors).double()
    cm = CoordinateManager(coords.cuda())
    cm.down_map(1)
    assert all(isinstance(lv.plan, TablePlan) for lv in cm.levels.values())
    assert isinstance(cm.down_maps[1].down, TablePlan) and isinstance(cm.down_maps[1].up, TablePlan)
    torch.manual_seed(0)
    cpu = build_backbone("Res16UNet34C", 3, 20, backend="torch").double()
    gpu = copy.deepcopy(cpu).cuda()
    getattr(cpu, mode)()
    getattr(gpu, mode)()
    g = torch.randn(len(coords), 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oc, dxc, gc = _step(cpu, coords, feats, "cpu", g)
    og, dxg, gg = _step(gpu, coords, feats, "cuda", g)
    assert rel(og, oc) < 1e-9
    assert rel(dxg, dxc) < 1e-9
    worst = max((rel(gg[k], gc[k]), k) for k in gc)
    assert worst[0] < 1e-9, worst
    for k, v in cpu.state_dict().items():
        if "running" in k:
            assert rel(gpu.state_dict()[k], v) < 1e-9, k


def test_bf16_autocast_on_cuda_stays_close_to_float32():
    coords, colors = room_batch(4000, seed=6)
    coords, feats = torch.from_numpy(coords).cuda(), torch.from_numpy(colors).cuda()
    torch.manual_seed(0)
    model = build_backbone("Res16UNet34C", 3, 20, backend="torch").cuda().eval()
    with torch.no_grad():
        ref = model(coords, feats)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(coords, feats)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).norm() / ref.norm()) < 3e-2
