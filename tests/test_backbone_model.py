"""Res16UNet on the torch backend: names and shapes of the public checkpoints, interface, errors."""

import numpy as np
import pytest
import torch
from torch import nn

import harness.backbones as hb
from harness.backbones import BACKBONES, available_backends, build_backbone, resolve_backend
from harness.backbones.synthetic import room_batch

SMALL = dict(layers=(1, 1, 1, 1, 1, 1, 1, 1), planes=(8, 8, 16, 16, 16, 16, 8, 8))


@pytest.fixture(scope="module")
def scene():
    coords, colors = room_batch(3000, seed=0)
    return torch.from_numpy(coords), torch.from_numpy(colors)


def test_res16unet34c_names_and_shapes_match_the_public_checkpoints():
    m = build_backbone("Res16UNet34C", in_channels=3, out_channels=20, backend="torch")
    sd = m.state_dict()
    expect = {
        "conv0p1s1.kernel": (27, 3, 32),
        "bn0.bn.weight": (32,),
        "bn0.bn.num_batches_tracked": (),
        "conv1p1s2.kernel": (8, 32, 32),
        "block1.0.conv1.kernel": (27, 32, 32),
        "block1.0.norm1.bn.running_var": (32,),
        "block1.1.conv2.kernel": (27, 32, 32),
        "block2.0.downsample.0.kernel": (32, 64),
        "block2.0.downsample.1.bn.bias": (64,),
        "block4.5.conv2.kernel": (27, 256, 256),
        "convtr4p16s2.kernel": (8, 256, 256),
        "bntr4.bn.weight": (256,),
        "block5.0.conv1.kernel": (27, 384, 256),
        "convtr7p2s2.kernel": (8, 96, 96),
        "block8.0.conv1.kernel": (27, 128, 96),
        "block8.0.downsample.0.kernel": (128, 96),
        "block8.1.conv2.kernel": (27, 96, 96),
        "final.kernel": (96, 20),
        "final.bias": (1, 20),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "block4.6.conv1.kernel" not in sd and "block8.2.conv1.kernel" not in sd
    n_params = sum(p.numel() for p in m.parameters())
    assert abs(n_params / 1e6 - 37.8) < 0.05
    assert m.name == "Res16UNet34C" and m.backend == "torch"
    assert m.layers == BACKBONES["Res16UNet34C"][0] and m.planes == BACKBONES["Res16UNet34C"][1]


def test_bn_momentum_reaches_only_the_trunk_norms():
    m = build_backbone("Res16UNet14A", backend="torch", bn_momentum=0.02)
    assert m.bn0.bn.momentum == 0.02 and m.bn4.bn.momentum == 0.02 and m.bntr7.bn.momentum == 0.02
    assert m.block1[0].norm1.bn.momentum == 0.1 and m.block2[0].downsample[1].bn.momentum == 0.1


def test_forward_shapes_order_and_features(scene):
    coords, feats = scene
    torch.manual_seed(0)
    m = build_backbone("Res16UNet14A", in_channels=3, out_channels=5, backend="torch", **SMALL).eval()
    out = m(coords, feats)
    assert out.shape == (len(coords), 5) and out.dtype == torch.float32
    f = m.forward_features(coords, feats)
    assert f.shape == (len(coords), SMALL["planes"][7])
    assert torch.allclose(m.final(f), out, atol=1e-5)  # the 1x1 final also applies to plain features
    # rows come back in input order: permuting the input permutes the output
    perm = torch.randperm(len(coords))
    out_p = m(coords[perm], feats[perm])
    assert torch.allclose(out_p, out[perm], atol=1e-5)


def test_a_shift_by_a_multiple_of_the_coarsest_stride_changes_nothing_even_far_from_the_origin(scene):
    # The same sites shifted by 16k voxels (16 = the coarsest tensor stride, so every level's
    # sites shift alike) are the same scene: equal outputs, bit for bit, up to the int32 range.
    # The shifted scenes straddle 2^16, 2^21, 2^24 and 2^30 (where fixed-width key packing or
    # float32 coordinates would break; MinkowskiEngine 0.5.4 moves by 13% relative at 2^24).
    coords, feats = scene
    assert int(coords[:, 1:].min()) < 32 < int(coords[:, 1:].max())  # so that -32 straddles
    m = build_backbone("Res16UNet14A", in_channels=3, out_channels=5, backend="torch", **SMALL).eval()
    with torch.no_grad():
        out = m(coords, feats)
        for shift in (16, 2**16 - 32, 2**21 - 32, 2**24 - 32, 2**30 - 32, -(2**16) - 32, -(2**30) - 32):
            c = coords.clone()
            c[:, 1:] += shift
            assert torch.equal(m(c, feats), out), shift


def test_final_can_be_replaced(scene):
    coords, feats = scene
    m = build_backbone("Res16UNet14A", out_channels=5, backend="torch", **SMALL)
    m.final = nn.Linear(SMALL["planes"][7], 7)
    assert m(coords, feats).shape == (len(coords), 7)
    m.final = nn.Identity()
    assert m(coords, feats).shape == (len(coords), SMALL["planes"][7])


def test_gradients_flow_to_every_parameter(scene):
    coords, feats = scene
    m = build_backbone("Res16UNet14A", out_channels=4, backend="torch", **SMALL).train()
    m(coords, feats).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_every_batch_norm_counts_each_training_forward_once(scene):
    """As nn.BatchNorm1d counts: +1 per forward in train mode, none in eval mode, whether the
    network counts for its norms in one op or a norm counts itself (momentum None: its
    cumulative average reads the counter, so it must not be counted twice)."""
    from harness.backbones.torch_backend import SparseBatchNorm
    from harness.backbones.sparse import SparseTensor

    coords, feats = scene
    m = build_backbone("Res16UNet14A", out_channels=4, backend="torch", **SMALL).train()
    m.bn1.bn.momentum = None
    for _ in range(2):
        m(coords, feats)
    m.eval()(coords, feats)
    counts = {k: int(v) for k, v in m.state_dict().items() if k.endswith("num_batches_tracked")}
    assert len(counts) == sum(isinstance(x, SparseBatchNorm) for x in m.modules()) > 10
    assert set(counts.values()) == {2}
    bn = SparseBatchNorm(3).train()  # on its own, outside a network
    x = SparseTensor(torch.randn(5, 3), torch.tensor([[0, i, 0, 0] for i in range(5)], dtype=torch.int32))
    bn(x)
    bn(x)
    assert int(bn.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("bad, match", [
    ("float_coords", "integer"),
    ("length", "rows"),
    ("channels", "in_channels=3"),
    ("empty", "empty batch"),
    ("duplicate", "duplicate coordinate"),
    ("shape", r"\(N, 4\)"),
    ("negative_batch", "batch index"),
])
def test_bad_input_is_a_clear_value_error(scene, bad, match):
    coords, feats = scene
    m = build_backbone("Res16UNet14A", backend="torch", **SMALL)
    c, f = coords, feats
    if bad == "float_coords":
        c = coords.float()
    elif bad == "length":
        f = feats[:-1]
    elif bad == "channels":
        f = torch.cat([feats, feats], 1)
    elif bad == "empty":
        c, f = coords[:0], feats[:0]
    elif bad == "duplicate":
        c = torch.cat([coords, coords[:1]])
        f = torch.cat([feats, feats[:1]])
    elif bad == "shape":
        c = coords[:, 1:]
    elif bad == "negative_batch":
        c = coords.clone()
        c[0, 0] = -1
    with pytest.raises(ValueError, match=match):
        m(c, f)


def test_names_and_backends():
    assert build_backbone("res16unet14a", backend="torch", **SMALL).name == "Res16UNet14A"
    with pytest.raises(ValueError, match="Did you mean: Res16UNet34C"):
        build_backbone("Res16UNet34", backend="torch")
    with pytest.raises(ValueError, match="Known: auto, torch, minkowski"):
        resolve_backend("cuda")
    assert "torch" in available_backends()
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") in ("torch", "minkowski")


def test_minkowski_backend_without_me_says_how_to_install(monkeypatch):
    monkeypatch.delenv("HARNESS_AUTO_BACKEND", raising=False)
    monkeypatch.setattr(hb, "_ME_STATUS", (False, "ModuleNotFoundError: No module named 'MinkowskiEngine'"))
    assert resolve_backend("auto") == "torch"
    assert available_backends() == ["torch"]
    with pytest.raises(ValueError, match="make minkowski"):
        resolve_backend("minkowski")


def test_auto_follows_the_environment_switch(monkeypatch):
    monkeypatch.setattr(hb, "_ME_STATUS", (True, ""))
    monkeypatch.delenv("HARNESS_AUTO_BACKEND", raising=False)
    assert resolve_backend("auto") == "minkowski"
    monkeypatch.setenv("HARNESS_AUTO_BACKEND", "torch")
    assert resolve_backend("auto") == "torch"
    assert resolve_backend("minkowski") == "minkowski"  # a named backend is not overridden
    monkeypatch.setenv("HARNESS_AUTO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HARNESS_AUTO_BACKEND='cuda'"):
        resolve_backend("auto")


def test_deepcopy_for_momentum_encoders(scene):
    import copy

    coords, feats = scene
    m = build_backbone("Res16UNet14A", out_channels=4, backend="torch", **SMALL).eval()
    m2 = copy.deepcopy(m)
    assert torch.equal(m(coords, feats), m2(coords, feats))


def _fresh_python(code: str, **env):
    import os
    import subprocess
    import sys

    ours = ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    e = {k: v for k, v in os.environ.items() if k not in ours}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout.split()


def test_harness_asks_openmp_to_wait_passively_unless_told_otherwise():
    """OpenMP reads OMP_WAIT_POLICY when torch loads: harness imported first sets PASSIVE (and
    knows it was in time), torch imported first is recorded so that the worker pool can say
    so, and an explicit setting is kept."""
    show = "import os, harness; print(os.environ['OMP_WAIT_POLICY'], harness.TORCH_LOADED_FIRST)"
    assert _fresh_python(show) == ["PASSIVE", "False"]
    assert _fresh_python("import torch; " + show) == ["PASSIVE", "True"]
    assert _fresh_python("import torch; " + show, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "False"]


def test_harness_asks_openblas_threads_to_sleep_soon_unless_told_otherwise():
    """OpenBLAS threads spin for 2^28 cycles after each call by default; MinkowskiEngine makes
    one call per kernel offset, and its step at 100k voxels on 2 cores took 9-10.5 s that way
    against 7.3-8.5 s with 2^4 (the benchmark would have compared against a handicapped ME)."""
    show = "import os, harness; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    assert _fresh_python(show) == ["4"]
    assert _fresh_python(show, OPENBLAS_THREAD_TIMEOUT="28") == ["28"]


def test_harness_enlarges_the_onednn_primitive_cache_unless_told_otherwise():
    """bf16 GEMMs of a sparse step come in thousands of shapes; oneDNN's default cache of 1024
    compiled primitives thrashes (a bf16 step at 100k voxels: 4.3 s against 2.7 s)."""
    show = "import os, harness; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    assert _fresh_python(show) == ["4096"]
    assert _fresh_python(show, ONEDNN_PRIMITIVE_CACHE_CAPACITY="100") == ["100"]
