"""InfoNCE values against numbers computed by hand, and the ResUNet's torchvision-compatible encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.image_guided.losses import info_nce, pixel_info_nce, point_pixel_info_nce
from methods.image_guided.resunet import ResNetEncoder, ResUNet, load_encoder_weights, load_resunet, save_resunet


def test_info_nce_by_hand():
    # anchors q0 = (1, 0), q1 = (0, 1); candidates k0 = (1, 0), k1 = (0.6, 0.8); tau = 0.5
    # row 0: logits (1, 0.6) / 0.5 = (2, 1.2), target 0: -log(e^2 / (e^2 + e^1.2)) = log(1 + e^-0.8)
    # row 1: logits (0, 0.8) / 0.5 = (0, 1.6), target 1: -log(e^1.6 / (1 + e^1.6)) = log(1 + e^-1.6)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    expect = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    assert math.isclose(float(info_nce(q, k, 0.5)), expect, rel_tol=1e-6)
    assert math.isclose(float(point_pixel_info_nce(q, k, 0.5)), expect, rel_tol=1e-6)


def test_pixel_loss_is_simclrs_nt_xent_by_hand():
    # the same vectors as pixels: a0 = (1, 0), a1 = (0, 1) in view A, b0 = (1, 0), b1 = (0.6, 0.8)
    # in view B, tau = 0.5. Each of the four is an anchor against the three others (logits
    # 2 x dot): a0: a1 0, b0 2 (positive), b1 1.2; a1: a0 0, b0 0, b1 1.6 (positive);
    # b0: a0 2 (positive), a1 0, b1 1.2; b1: a0 1.2, a1 1.6 (positive), b0 1.2
    e = math.exp
    rows = [-math.log(e(2) / (e(0) + e(2) + e(1.2))), -math.log(e(1.6) / (1 + 1 + e(1.6))),
            -math.log(e(2) / (e(2) + 1 + e(1.2))), -math.log(e(1.6) / (e(1.2) + e(1.6) + e(1.2)))]
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert math.isclose(float(pixel_info_nce(a, b, 0.5)), sum(rows) / 4, rel_tol=1e-6)
    assert math.isclose(float(pixel_info_nce(b, a, 0.5)), sum(rows) / 4, rel_tol=1e-6)  # symmetric


def test_pixel_loss_against_a_loop_over_anchors_chunked_or_not():
    g = np.random.default_rng(3)
    a = g.normal(size=(9, 5))
    b = a + 0.3 * g.normal(size=(9, 5))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    z = np.concatenate([a, b])
    total = 0.0
    for i in range(18):
        pos = (i + 9) % 18
        others = [j for j in range(18) if j != i]
        total += -z[i] @ z[pos] / 0.4 + math.log(sum(math.exp(z[i] @ z[j] / 0.4) for j in others))
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert math.isclose(float(pixel_info_nce(ta, tb, 0.4)), total / 18, rel_tol=1e-6)  # logits in float32
    assert math.isclose(float(pixel_info_nce(ta, tb, 0.4, chunk=4)), total / 18, rel_tol=1e-6)


def test_info_nce_three_pairs_tau_04_by_hand():
    # three 2-d unit vectors at 0, 90 and 180 degrees, matched to themselves, tau = 0.4:
    # every row has logits 1/0.4 = 2.5 (itself), 0 (orthogonal) and -2.5 or 0 for the others
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    r0 = -math.log(math.exp(2.5) / (math.exp(2.5) + 1 + math.exp(-2.5)))  # others: 0 deg->90 (0), ->180 (-2.5)
    r1 = -math.log(math.exp(2.5) / (math.exp(2.5) + 1 + 1))  # 90 deg is orthogonal to both
    r2 = r0
    assert math.isclose(float(info_nce(z, z, 0.4)), (r0 + r1 + r2) / 3, rel_tol=1e-6)


def test_chunked_info_nce_equals_the_direct_one_with_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1).requires_grad_()
    direct = info_nce(q, k, 0.4)
    gq, gk = torch.autograd.grad(direct, (q, k))
    chunked = info_nce(q, k, 0.4, chunk=8)
    cq, ck = torch.autograd.grad(chunked, (q, k))
    assert math.isclose(direct.item(), chunked.item(), rel_tol=1e-5)
    torch.testing.assert_close(gq, cq)
    torch.testing.assert_close(gk, ck)


def test_point_pixel_loss_does_not_train_the_2d_side():
    p = torch.nn.functional.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    point_pixel_info_nce(p, t, 0.4).backward()
    assert p.grad is not None and t.grad is None


# ----------------------------------------------------------------------------------------------
# ResUNet


def test_encoder_has_torchvision_names_and_sizes():
    enc = ResNetEncoder("resnet18")
    state = enc.state_dict()
    assert tuple(state["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(state["layer4.1.bn2.running_var"].shape) == (512,)
    assert "layer1.0.downsample.0.weight" not in state
    # torchvision's resnet18 has 11,689,512 parameters, of which the 512 x 1000 classifier is 513,000
    assert sum(p.numel() for p in enc.parameters()) == 11_689_512 - 513_000
    # resnet34: 21,797,672 in torchvision
    assert sum(p.numel() for p in ResNetEncoder("resnet34").parameters()) == 21_797_672 - 513_000


def test_encoder_weights_load_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    donor = ResNetEncoder("resnet18").state_dict()
    donor = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v for k, v in donor.items()}
    donor["fc.weight"], donor["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(donor, path)
    net = ResUNet("resnet18")
    report = load_encoder_weights(net.encoder, path)
    assert report["skipped"] == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(net.encoder.layer3[1].conv2.weight,
                               donor["layer3.1.conv2.weight"])
    # a resnet34 file does not fit resnet18: refused, naming the problem
    torch.save(ResNetEncoder("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="r34.pth"):
        load_encoder_weights(ResNetEncoder("resnet18"), tmp_path / "r34.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_encoder_weights(net.encoder, tmp_path / "missing.pth")


def test_resunet_gives_unit_features_per_pixel_and_round_trips(tmp_path):
    net = ResUNet("resnet18", feature_dim=16).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        y = net(x)
    assert tuple(y.shape) == (2, 16, 64, 96)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2, 64, 96))
    with pytest.raises(ValueError, match="multiple of 32"):
        net(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="at least 64"):
        net(torch.rand(1, 3, 32, 64))
    path = save_resunet(tmp_path / "net.safetensors", net)
    again, meta = load_resunet(path)
    assert meta["encoder"] == "resnet18" and meta["feature_dim"] == 16
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), y)


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
        local = z[2 * rank:2 * rank + 2].clone().requires_grad_()
        loss = pixel_info_nce(local, local, 0.5)
        loss.backward()
        torch.save({"loss": loss.item(), "grad": local.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_negatives_come_from_every_rank(tmp_path):
    # four unit vectors at 0, 90, 180, 270 degrees, two per rank, each seen identically in both
    # views, tau = 0.5. An anchor's 7 candidates in the global batch (itself excluded): its other
    # view (logit 2, the positive), both views of the two orthogonal pixels (0, four times) and
    # both views of the opposite one (-2, twice):
    #   loss = -log(e^2 / (e^2 + 4 + 2 e^-2)) = log(1 + 4 e^-2 + 2 e^-4)
    # (a rank-local loss would see 3 candidates: log(1 + 2 e^-2) on both ranks)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    expect = math.log(1 + 4 * math.exp(-2) + 2 * math.exp(-4))
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert math.isclose(out["loss"], expect, rel_tol=1e-6)
        assert out["grad"] is not None and torch.isfinite(out["grad"]).all()
