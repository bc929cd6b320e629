"""The torch backend against MinkowskiEngine 0.5.4 itself (skipped where ME is not installed;
CI installs it with `make minkowski`)."""

import warnings

import pytest
import torch

ME = pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine not installed (make minkowski)")

from harness.backbones import build_backbone, gemm, kernel_map  # noqa: E402
from harness.backbones.sparse import SparseTensor  # noqa: E402
from harness.backbones.synthetic import room_batch  # noqa: E402
from harness.backbones.torch_backend import SparseConv, SparseConvTranspose  # noqa: E402

warnings.filterwarnings("ignore", module="MinkowskiEngine")


def rel(a, b):
    """max |a - b| / max |b|"""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def scene():
    coords, colors = room_batch(2500, seed=3)
    return torch.from_numpy(coords), torch.from_numpy(colors)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    mt = build_backbone("Res16UNet34C", 3, 20, backend="torch")
    mm = build_backbone("Res16UNet34C", 3, 20, backend="minkowski")
    assert list(mt.state_dict()) == list(mm.state_dict())
    for (k, a), b in zip(mt.state_dict().items(), mm.state_dict().values()):
        assert a.shape == b.shape, k
    return mt, mm


def _step(model, coords, feats, dtype, mode, sd):
    model.load_state_dict(sd)
    model.to(dtype)
    getattr(model, mode)()
    model.zero_grad()
    f = feats.to(dtype).clone().requires_grad_()
    out = model(coords, f)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    (out * g).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    return out.detach(), f.grad.detach(), grads, stats


def _assert_agree(ours, theirs, tol=1e-5):
    """Outputs, input gradients, every weight gradient and the running statistics of two
    :func:`_step` results agree to ``tol`` relative."""
    (ot, dxt, gt, st), (om, dxm, gm, sm) = ours, theirs
    assert rel(ot, om) < tol
    assert rel(dxt, dxm) < tol
    worst = max((rel(gt[k], gm[k]), k) for k in gt)
    assert worst[0] < tol, worst
    for k in sm:
        assert rel(st[k], sm[k]) < tol, k


@pytest.mark.minkowski
@pytest.mark.parametrize("mode,offset_major_sites,spill_below,table,lines,cpu_gemm", [
    ("train", 1000, kernel_map.SPILL_BELOW, False, False, "torch"),
    ("eval", 1000, kernel_map.SPILL_BELOW, False, False, "torch"),
    ("train", 0, kernel_map.SPILL_BELOW, False, False, "torch"), ("train", 0, 0.0, False, False, "torch"),
    ("train", 0, kernel_map.SPILL_BELOW, False, True, "torch"),
    ("train", 10**9, kernel_map.SPILL_BELOW, False, False, "torch"),
    ("train", 10**9, kernel_map.SPILL_BELOW, True, False, "torch"),
    ("train", 1000, kernel_map.SPILL_BELOW, False, False, "numpy"),
    ("train", 0, kernel_map.SPILL_BELOW, False, True, "numpy")])
def test_res16unet34c_equal_on_both_backends_float64(scene, models, mode, offset_major_sites, spill_below, table,
                                                     lines, cpu_gemm, monkeypatch):
    """Same state_dict and input: outputs, input and weight gradients (and in train mode the
    updated running statistics) agree to 1e-5 relative (in fact to rounding, ~1e-12).
    With 1000 the stride-1 level (about 2500 sites) runs in buckets and the coarser ones
    offset by offset; with 0 every level runs in buckets (rare offsets spilled, or none) or, with
    ``lines``, as line plans; with 10**9 every level and every stride-2 map offset by offset on
    the worker threads, or as table plans (the GPU's scheme, forced on the CPU). ``cpu_gemm``:
    the library that multiplies (harness.backbones.gemm)."""
    skip_without(cpu_gemm)
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", offset_major_sites)
    monkeypatch.setattr(kernel_map, "SPILL_BELOW", spill_below)
    monkeypatch.setattr(kernel_map, "LINE_PLAN_PADDING", -1.0 if lines else kernel_map.LINE_PLAN_PADDING)
    if table:
        monkeypatch.setattr(kernel_map, "uses_table_plans", lambda device: True)
    coords, feats = scene
    mt, mm = models
    sd = {k: v.clone() for k, v in mt.state_dict().items()}
    with gemm.using(cpu_gemm):
        ours = _step(mt, coords, feats, torch.float64, mode, sd)
    _assert_agree(ours, _step(mm, coords, feats, torch.float64, mode, sd))


def skip_without(cpu_gemm: str) -> None:
    if cpu_gemm == "numpy" and gemm._numpy_openblas() is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS with per-thread thread counts")


def l2rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.minkowski
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cpu_gemm", ["torch", "numpy"])
def test_res16unet34c_float32_close_to_me(scene, models, mode, cpu_gemm):
    """float32: outputs agree to 1e-5 relative (eval; 3e-5 in train mode). Gradients in float32 are not comparable
    element by element: a pre-activation within ~1e-8 of zero can round to either side of
    the ReLU kink in either backend, which switches that element's gradient on or off (seen:
    one such site among 63k moved an input gradient by 4e-4 of its maximum), and in train
    mode BatchNorm's backward cancels large terms (ME's own float32 weight gradients are ~5%
    off float64). So gradients get an L2 sanity bound against the float64 reference, which a
    wrong map or weight order would exceed by orders of magnitude; exact equality of the
    gradients is the float64 test above."""
    coords, feats = scene
    mt, mm = models
    sd = {k: v.double().clone() if v.is_floating_point() else v.clone() for k, v in mt.state_dict().items()}
    skip_without(cpu_gemm)
    ref = _step(mm, coords, feats, torch.float64, mode, sd)
    with gemm.using(cpu_gemm):
        ours = _step(mt, coords, feats, torch.float32, mode, sd)
    me = _step(mm, coords, feats, torch.float32, mode, sd)
    mt.double()
    mm.double()
    # train mode: BatchNorm over batch statistics; ME's own float32 output is ~5e-6 off float64
    assert rel(ours[0], me[0]) < (1e-5 if mode == "eval" else 3e-5)
    bound = 2e-2 if mode == "eval" else 2e-1
    assert l2rel(ours[1], ref[1]) < bound
    worst = max((l2rel(ours[2][k], ref[2][k]), k) for k in ref[2])
    me_worst = max(l2rel(me[2][k], ref[2][k]) for k in ref[2])
    assert worst[0] < max(bound, 4 * me_worst), (worst, me_worst)


@pytest.mark.minkowski
def test_me_state_dict_loads_into_torch_model(scene):
    coords, feats = scene
    torch.manual_seed(1)
    mm = build_backbone("Res16UNet14A", 3, 13, backend="minkowski").eval()
    mt = build_backbone("Res16UNet14A", 3, 13, backend="torch").eval()
    mt.load_state_dict(mm.state_dict())
    assert rel(mt(coords, feats), mm(coords, feats)) < 1e-5


def _me_tensor(feats, coords):
    return ME.SparseTensor(feats, coords, quantization_mode=ME.SparseTensorQuantizationMode.RANDOM_SUBSAMPLE)


def _rows_by_coords(c_ref, c, f):
    """Reorder rows of f (at coords c) to the row order of c_ref."""
    key = lambda c: ((c[:, 0].long() * 4096 + c[:, 1] + 2048) * 4096 + c[:, 2] + 2048) * 4096 + c[:, 3] + 2048
    order = torch.argsort(key(c))
    pos = torch.searchsorted(key(c)[order], key(c_ref))
    assert torch.equal(key(c)[order][pos], key(c_ref))
    return f[order][pos]


@pytest.mark.minkowski
def test_single_ops_match_me_including_negative_coords():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    c = torch.unique(torch.randint(-9, 9, (600, 4), generator=g), dim=0)
    c[:, 0] = c[:, 0].abs() % 2
    c = torch.unique(c, dim=0).int()
    f = torch.randn(len(c), 4, dtype=torch.float64)
    # stride-1 kernel-3
    ours = SparseConv(4, 5, 3).double()
    theirs = ME.MinkowskiConvolution(4, 5, kernel_size=3, stride=1, dimension=3).double()
    theirs.kernel.data.copy_(ours.kernel.data)
    x_me = _me_tensor(f, c)
    y_me = theirs(x_me)
    y = ours(SparseTensor(f, c))
    assert rel(y.F, _rows_by_coords(y.C, y_me.C, y_me.F)) < 1e-12
    # stride-2 kernel-2, then the transposed conv back
    dn, dn_me = SparseConv(4, 3, 2, 2).double(), ME.MinkowskiConvolution(4, 3, kernel_size=2, stride=2, dimension=3).double()
    dn_me.kernel.data.copy_(dn.kernel.data)
    up, up_me = SparseConvTranspose(3, 2).double(), ME.MinkowskiConvolutionTranspose(3, 2, kernel_size=2, stride=2, dimension=3).double()
    up_me.kernel.data.copy_(up.kernel.data)
    x = SparseTensor(f, c)
    z, z_me = dn(x), dn_me(x_me)
    assert z.stride == 2 and z_me.tensor_stride == [2, 2, 2]
    assert torch.equal(torch.unique(z.C, dim=0), torch.unique(z_me.C, dim=0))  # floor, also below zero
    assert rel(z.F, _rows_by_coords(z.C, z_me.C, z_me.F)) < 1e-12
    u, u_me = up(z), up_me(z_me)
    assert rel(u.F, _rows_by_coords(u.C, u_me.C, u_me.F)) < 1e-12


def _scattered_batch(n_items: int, seed: int) -> torch.Tensor:
    """Several batch items, rows shuffled across items: a surface sheet plus scattered sites
    on both sides of the origin (isolated sites, holes, negative coordinates)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for b in range(n_items):
        scattered = torch.randint(-30, 30, (250, 3), generator=g)
        uv = torch.randint(-20, 20, (500, 2), generator=g)
        sheet = torch.cat([uv, torch.full((500, 1), b - 3)], dim=1)
        xyz = torch.unique(torch.cat([scattered, sheet]), dim=0)
        items.append(torch.cat([torch.full((len(xyz), 1), b), xyz], dim=1))
    c = torch.cat(items)
    return c[torch.randperm(len(c), generator=g)].int()


@pytest.mark.minkowski
@pytest.mark.parametrize("name,c_in,c_out,n_items,mode", [
    ("Res16UNet14A", 1, 13, 3, "train"), ("Res16UNet14A", 6, 1, 1, "eval"),
    ("Res16UNet34C", 4, 32, 2, "eval"), ("Res16UNet34C", 1, 2, 3, "train")])
def test_other_variants_channels_and_batches_equal_on_both_backends_float64(name, c_in, c_out, n_items, mode):
    """Beyond the room scene: the other architecture, other channel counts, several batch
    items in shuffled rows, sites below zero; BatchNorm statistics and affine parameters moved
    off their initial values so that eval mode exercises them. Outputs and all gradients agree
    to 1e-5 relative (in fact ~1e-13)."""
    coords = _scattered_batch(n_items, seed=c_in * 10 + c_out)
    feats = torch.randn(len(coords), c_in, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(4)
    mt = build_backbone(name, c_in, c_out, backend="torch")
    mm = build_backbone(name, c_in, c_out, backend="minkowski")
    g = torch.Generator().manual_seed(6)
    sd = {}
    for k, v in mt.state_dict().items():
        v = v.double() if v.is_floating_point() else v.clone()
        if k.endswith(("running_mean", "bn.bias")):
            v = v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        elif k.endswith(("running_var", "bn.weight")):
            v = v * (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype))
        sd[k] = v
    _assert_agree(_step(mt, coords, feats, torch.float64, mode, sd), _step(mm, coords, feats, torch.float64, mode, sd))
