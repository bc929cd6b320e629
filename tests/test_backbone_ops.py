"""Each sparse operation of the torch backend against an independent dense reference.

The random sparse input is densified and pushed through torch.nn.functional.conv3d /
conv_transpose3d; values and gradients (features and weights) must agree. Coordinates include
negative values, two batch items and tensor strides above 1.
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.backbones import gemm, kernel_map, ops, workers
from harness.backbones.kernel_map import (KERNEL2, KERNEL3, CoordinateManager, LinePlan, OffsetPlan, Plan,
                                         TablePlan, choose_buckets)
from harness.backbones.ops import global_pool
from harness.backbones.sparse import SparseTensor
from harness.backbones.torch_backend import SparseBatchNorm, SparseConv, SparseConvTranspose, TorchOps

DT = torch.float64


@pytest.fixture(autouse=True, params=["torch", "numpy"])
def cpu_gemm(request):
    """Every test with each library that can multiply on the CPU (harness.backbones.gemm)."""
    if request.param == "numpy" and gemm._numpy_openblas() is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS with per-thread thread counts")
    with gemm.using(request.param):
        yield request.param


def random_sites(seed, n_batch=2, extent=6, density=0.35, stride=1):
    """Unique sites (N, 4) int32 in [-extent, extent)^3 * stride, batch index first."""
    rng = np.random.default_rng(seed)
    parts = []
    for b in range(n_batch):
        grid = np.stack(np.meshgrid(*[np.arange(-extent, extent)] * 3, indexing="ij"), -1).reshape(-1, 3)
        keep = grid[rng.random(len(grid)) < density]
        parts.append(np.concatenate([np.full((len(keep), 1), b), keep * stride], 1))
    c = np.concatenate(parts).astype(np.int32)
    return torch.from_numpy(c[rng.permutation(len(c))])


def _put(dense, b, lat, feats):
    idx = (b, slice(None), lat[:, 0], lat[:, 1], lat[:, 2])
    out = dense.clone()
    out[idx] = feats
    return out


def sample(dense, coords, stride, lo):
    lat = torch.div(coords[:, 1:].long() - lo, stride, rounding_mode="floor")
    return dense[coords[:, 0].long(), :, lat[:, 0], lat[:, 1], lat[:, 2]]


def dense_weight(kernel, k):
    """ME kernel (k^3, in, out) -> conv3d weight (out, in, k, k, k) with offset i at
    (i mod k, (i div k) mod k, i div k^2) in (x, y, z)."""
    kv, cin, cout = kernel.shape
    w = kernel.reshape(k, k, k, cin, cout)  # [z][y][x] since x is fastest
    return w.permute(4, 3, 2, 1, 0)  # (out, in, x, y, z)


@pytest.fixture(params=["buckets", "spill", "lines", "offsets", "blocks", "table"])
def scheme(request, monkeypatch):
    """Every convolution in buckets (none spilled, or on these 35%-dense sites the offsets that
    are rarer near the border, most edges and corners, spilled), or every 3x3x3 one as a line
    plan (where the row order is free; the stride-2 maps in buckets), or every one offset by
    offset on the worker threads (with a product matrix, or in blocks of rows: a few blocks of
    about 300 pairs), or as table plans (the GPU's scheme, forced on the CPU: one gather and one
    GEMM)."""
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 10**9 if request.param in ("offsets", "blocks", "table")
                        else 0)
    monkeypatch.setattr(ops, "BLOCKED_PRODUCTS_BYTES", 0 if request.param == "blocks" else 1 << 62)
    monkeypatch.setattr(ops, "BLOCK_PAIRS", 300)
    monkeypatch.setattr(kernel_map, "SPILL_BELOW", 0.3 if request.param == "spill" else 0.0)
    monkeypatch.setattr(kernel_map, "LINE_PLAN_PADDING", -1.0 if request.param == "lines" else 10.0)
    if request.param == "table":
        monkeypatch.setattr(kernel_map, "uses_table_plans", lambda device: True)
    return request.param


def test_offset_tables_match_me_order():
    for i in range(27):
        assert KERNEL3[i].tolist() == [i % 3 - 1, (i // 3) % 3 - 1, i // 9 - 1]
    for i in range(8):
        assert KERNEL2[i].tolist() == [i % 2, (i // 2) % 2, i // 4]


@pytest.mark.parametrize("stride", [1, 4])
def test_stride1_conv_matches_dense_conv3d(stride, scheme):
    torch.manual_seed(0)
    coords = random_sites(1, stride=stride)
    feats = torch.randn(len(coords), 5, dtype=DT, requires_grad=True)
    conv = SparseConv(5, 7, kernel_size=3, stride=1).to(DT)
    x = SparseTensor(feats, coords, stride=stride, reorder=True)
    out = conv(x)
    coords_int = x.C
    lo = torch.tensor([-6 * stride] * 3)
    dense_in = _put(feats.new_zeros((2, 5, 12, 12, 12)), coords_int[:, 0].long(),
                    torch.div(coords_int[:, 1:].long() - lo, stride, rounding_mode="floor"), x.F)
    ref = sample(F.conv3d(dense_in, dense_weight(conv.kernel, 3), padding=1), coords_int, stride, lo)
    assert torch.allclose(out.F, ref, atol=1e-12, rtol=1e-10)
    grad = torch.randn_like(ref)
    gx, gw = torch.autograd.grad((out.F * grad).sum(), (feats, conv.kernel), retain_graph=True)
    rx, rw = torch.autograd.grad((ref * grad).sum(), (feats, conv.kernel))
    assert torch.allclose(gx, rx, atol=1e-12, rtol=1e-10)
    assert torch.allclose(gw, rw, atol=1e-12, rtol=1e-10)


def test_stride1_weight_gradient_without_input_gradient_matches_dense_conv3d(scheme):
    # the stem: input features that need no gradient, fewer channels in than out
    torch.manual_seed(8)
    coords = random_sites(3)
    feats = torch.randn(len(coords), 2, dtype=DT)
    conv = SparseConv(2, 6, kernel_size=3).to(DT)
    x = SparseTensor(feats, coords, reorder=True)
    out = conv(x)
    lo = torch.tensor([-6] * 3)
    dense_in = _put(feats.new_zeros((2, 2, 12, 12, 12)), x.C[:, 0].long(), x.C[:, 1:].long() - lo, x.F)
    ref = sample(F.conv3d(dense_in, dense_weight(conv.kernel, 3), padding=1), x.C, 1, lo)
    grad = torch.randn_like(ref)
    gw, = torch.autograd.grad((out.F * grad).sum(), (conv.kernel,))
    rw, = torch.autograd.grad((ref * grad).sum(), (conv.kernel,))
    assert torch.allclose(gw, rw, atol=1e-12, rtol=1e-10)


def test_stride1_conv_keeps_input_order_without_reorder(scheme):
    coords = random_sites(2)
    feats = torch.randn(len(coords), 3, dtype=DT)
    conv = SparseConv(3, 4, 3).to(DT)
    out = conv(SparseTensor(feats, coords))  # reorder=False: rows stay in input order
    assert torch.equal(out.C, coords)
    lo = torch.tensor([-6] * 3)
    dense_in = _put(feats.new_zeros((2, 3, 12, 12, 12)), coords[:, 0].long(), coords[:, 1:].long() - lo, feats)
    ref = sample(F.conv3d(dense_in, dense_weight(conv.kernel, 3), padding=1), coords, 1, lo)
    assert torch.allclose(out.F, ref, atol=1e-12)


def test_downsample_conv_matches_dense_strided_conv3d_and_floors_negative_coords(scheme):
    torch.manual_seed(1)
    coords = random_sites(3)
    feats = torch.randn(len(coords), 4, dtype=DT, requires_grad=True)
    conv = SparseConv(4, 6, kernel_size=2, stride=2).to(DT)
    x = SparseTensor(feats, coords, reorder=True)
    out = conv(x)
    assert out.stride == 2
    # Output sites are the input sites floored to multiples of 2 (floor, also below zero).
    expect = torch.unique(torch.cat([coords[:, :1], torch.div(coords[:, 1:], 2, rounding_mode="floor") * 2], 1), dim=0)
    got = torch.unique(out.C, dim=0)
    assert torch.equal(got, expect)
    lo = torch.tensor([-6] * 3)
    dense_in = _put(feats.new_zeros((2, 4, 12, 12, 12)), x.C[:, 0].long(), x.C[:, 1:].long() - lo, x.F)
    dense_out = F.conv3d(dense_in, dense_weight(conv.kernel, 2), stride=2)
    ref = sample(dense_out, out.C, 2, lo)
    assert torch.allclose(out.F, ref, atol=1e-12)
    grad = torch.randn_like(ref)
    gx, gw = torch.autograd.grad((out.F * grad).sum(), (feats, conv.kernel), retain_graph=True)
    rx, rw = torch.autograd.grad((ref * grad).sum(), (feats, conv.kernel))
    assert torch.allclose(gx, rx, atol=1e-12)
    assert torch.allclose(gw, rw, atol=1e-12)


def test_transposed_conv_matches_dense_conv_transpose3d_on_recorded_sites(scheme):
    torch.manual_seed(2)
    coords = random_sites(4)
    feats = torch.randn(len(coords), 3, dtype=DT)
    x = SparseTensor(feats, coords, reorder=True)
    down = SparseConv(3, 5, 2, 2).to(DT)
    y = down(x)
    yf = torch.randn(y.F.shape, dtype=DT, requires_grad=True)
    y = y.replace(yf)
    up = SparseConvTranspose(5, 4, 2, 2).to(DT)
    out = up(y)
    assert out.stride == 1 and torch.equal(out.C, x.C)  # back onto the finer site set
    lo = torch.tensor([-6] * 3)
    dense_y = _put(yf.new_zeros((2, 5, 6, 6, 6)), y.C[:, 0].long(),
                   torch.div(y.C[:, 1:].long() - lo, 2, rounding_mode="floor"), yf)
    # conv_transpose3d weight is (in, out, k, k, k)
    w = dense_weight(up.kernel, 2).transpose(0, 1)
    dense_out = F.conv_transpose3d(dense_y, w, stride=2)
    ref = sample(dense_out, out.C, 1, lo)
    assert torch.allclose(out.F, ref, atol=1e-12)
    grad = torch.randn_like(ref)
    gy, gw = torch.autograd.grad((out.F * grad).sum(), (yf, up.kernel))
    ry, rw = torch.autograd.grad((ref * grad).sum(), (yf, up.kernel))
    assert torch.allclose(gy, ry, atol=1e-12)
    assert torch.allclose(gw, rw, atol=1e-12)


def test_transposed_conv_without_recorded_finer_set_is_an_error():
    coords = random_sites(5, stride=2)
    x = SparseTensor(torch.randn(len(coords), 3), coords, stride=2)
    with pytest.raises(ValueError, match="finer coordinate set"):
        SparseConvTranspose(3, 3)(x)


def test_batchnorm_over_active_sites_relu_cat_and_linear():
    torch.manual_seed(3)
    coords = random_sites(6)
    feats = torch.randn(len(coords), 4, dtype=DT)
    x = SparseTensor(feats, coords)
    bn = SparseBatchNorm(4).to(DT).train()
    out = bn(x).F
    mean, var = feats.mean(0), feats.var(0, unbiased=False)
    assert torch.allclose(out, (feats - mean) / torch.sqrt(var + 1e-5), atol=1e-10)
    r = TorchOps.relu()(x.replace(feats.clone()))
    assert torch.equal(r.F, feats.clamp(min=0))
    c = TorchOps.cat(x, x.replace(2 * feats))
    assert torch.equal(c.F, torch.cat([feats, 2 * feats], 1))
    lin = SparseConv(4, 3, kernel_size=1, bias=True).to(DT)
    assert tuple(lin.kernel.shape) == (4, 3) and tuple(lin.bias.shape) == (1, 3)
    assert torch.allclose(lin(x).F, feats @ lin.kernel + lin.bias)


def test_bucketing_covers_each_row_with_a_superset_mask():
    rng = np.random.default_rng(0)
    masks = rng.integers(1, 2**27, size=5000) & rng.integers(1, 2**27, size=5000)
    masks = np.concatenate([masks, np.full(3000, 0b111000000111000000111, dtype=np.int64)])
    for overhead in (0.0, 200.0, 1e9):
        b, bm = choose_buckets(torch.from_numpy(masks), 27, overhead=overhead)
        assert np.all((masks & ~bm[b]) == 0)
    b, bm = choose_buckets(torch.from_numpy(masks), 27, overhead=1e9)
    assert len(bm) == 1


def test_spilled_pairs_and_bucket_entries_are_the_table_once_each(monkeypatch):
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 0)
    monkeypatch.setattr(kernel_map, "SPILL_BELOW", 0.3)
    monkeypatch.setattr(kernel_map, "LINE_PLAN_PADDING", 10.0)  # random sites: buckets would pad ~60%
    level = CoordinateManager(random_sites(1), keep_tables=True).level(1)
    table, plan = level.table, level.plan
    assert plan.spill is not None and max(b.k for b in plan.buckets) > 1  # both parts in use
    seen = torch.zeros_like(table, dtype=torch.int64)
    for b in plan.buckets:
        rows = torch.arange(b.start, b.start + b.n) if b.rows is None else b.rows
        sub = table[rows][:, b.cols]
        present = sub >= 0
        assert torch.equal(b.idx.view(b.n, b.k)[present], sub[present])
        seen[rows[:, None].expand_as(sub)[present], b.cols.expand_as(sub)[present]] += 1
    offs = torch.repeat_interleave(torch.tensor(plan.spill.offsets), torch.tensor(plan.spill.seg).diff())
    assert torch.equal(table[plan.spill.out_rows, offs], plan.spill.in_rows)
    seen[plan.spill.out_rows, offs] += 1
    assert torch.equal(seen, (table >= 0).long())  # every neighbour entry exactly once
    offs_t = torch.repeat_interleave(torch.tensor(plan.spill_t.offsets), torch.tensor(plan.spill_t.seg).diff())
    assert torch.equal(table[plan.spill_t.out_rows, offs_t], plan.spill_t.in_rows)  # q = s - d_j: offset 26 - j
    assert sorted(zip(plan.spill_t.in_rows.tolist(), (26 - offs_t).tolist())) == \
        sorted(zip(plan.spill.out_rows.tolist(), offs.tolist()))
    assert plan.n_entries == sum(b.n * b.k for b in plan.buckets) + len(plan.spill.out_rows)


def test_kernel_map_neighbours_match_brute_force(scheme):
    coords = random_sites(7, extent=4)
    cm = CoordinateManager(coords, reorder=True, keep_tables=True)
    lv = cm.level(1)
    c = lv.coords
    lookup = {tuple(r): i for i, r in enumerate(c.tolist())}
    for r in range(0, len(c), 7):
        for i in range(27):
            q = (c[r, 0], *(c[r, 1:] + KERNEL3[i]))
            assert lv.table[r, i] == lookup.get(tuple(int(v) for v in q), -1)
    # the reorder permutation round-trips
    f = torch.arange(len(coords), dtype=torch.float64)[:, None]
    assert torch.equal(cm.to_input_order(cm.to_internal(f)), f)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_global_pool_matches_per_item_loop(mode):
    torch.manual_seed(4)
    bi = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    f = torch.randn(7, 3, dtype=DT, requires_grad=True)
    out = global_pool(f, bi, mode)
    ref = torch.stack([(f[bi == b].max(0).values if mode == "max" else f[bi == b].mean(0)) for b in range(3)])
    assert torch.allclose(out, ref)
    g = torch.autograd.grad(out.sum(), f)[0]
    gr = torch.autograd.grad(ref.sum(), f)[0]
    assert torch.allclose(g, gr)


def test_global_pool_refuses_empty_items_and_bad_input():
    f = torch.randn(3, 2)
    with pytest.raises(ValueError, match="no sites"):
        global_pool(f, torch.tensor([0, 0, 2]))
    with pytest.raises(ValueError, match="batch_size"):
        global_pool(f, torch.tensor([0, 1, 2]), batch_size=2)
    with pytest.raises(ValueError, match="mode"):
        global_pool(f, torch.tensor([0, 1, 2]), mode="sum")
    assert global_pool(f, torch.tensor([0, 0, 0]), "avg", batch_size=1).shape == (1, 2)


def test_bf16_autocast_runs_and_stays_close(scheme):
    torch.manual_seed(5)
    coords = random_sites(8)
    feats = torch.randn(len(coords), 16)
    conv = SparseConv(16, 16, 3)
    x = SparseTensor(feats, coords)
    ref = conv(x).F
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x).F
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 3e-2


def test_scheme_follows_the_site_count_of_each_level(monkeypatch):
    coords = random_sites(9, extent=8)  # about 2 x 1800 sites at stride 1, a quarter of that at 2
    n1 = len(coords)
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", n1 - 1)
    monkeypatch.setattr(kernel_map, "LINE_PLAN_PADDING", 10.0)
    cm = CoordinateManager(coords)
    assert isinstance(cm.level(1).plan, Plan)
    assert isinstance(cm.level(2).plan, OffsetPlan) and cm.level(2).n < n1 - 1
    # offset by offset nothing is padded: one entry per (site, neighbour) pair
    assert cm.level(2).plan.n_entries == cm.level(2).n_pairs
    assert cm.level(2).stats()["padding"] == 0.0
    # the stride-2 maps follow their fine set: from stride 1 in buckets, from stride 2 by offsets
    assert isinstance(cm.down_map(1).down, Plan) and isinstance(cm.down_map(1).up, Plan)
    dm = cm.down_map(2)
    assert isinstance(dm.down, OffsetPlan) and isinstance(dm.up, OffsetPlan)
    assert dm.down.n_entries == dm.up.n_entries == cm.level(2).n  # one pair per fine site


def test_line_plan_where_buckets_would_pad_much(monkeypatch):
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 0)
    # 35% of a cube's voxels at random: nearly every site has its own neighbour mask
    assert isinstance(CoordinateManager(random_sites(9, extent=8)).level(1).plan, LinePlan)
    # a full square of a plane: the inner sites share one mask (9 offsets), the border 3 more
    g = np.stack(np.meshgrid(np.arange(60), np.arange(60), indexing="ij"), -1).reshape(-1, 2)
    plane = torch.from_numpy(np.concatenate([np.zeros((len(g), 1)), g, np.zeros((len(g), 1))], 1).astype(np.int32))
    assert isinstance(CoordinateManager(plane).level(1).plan, Plan)
    # input order kept: no line plan (its rows need their own order)
    assert isinstance(CoordinateManager(random_sites(9, extent=8), reorder=False).level(1).plan, Plan)
    # maps built under autocast: buckets (bf16 GEMMs of ever new shapes are slow)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(CoordinateManager(random_sites(9, extent=8)).level(1).plan, Plan)


def test_line_plan_holds_each_table_entry_once_and_writes_the_centre_line_in_slices(monkeypatch):
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 0)
    monkeypatch.setattr(kernel_map, "LINE_BLOCK_PAIRS", 2000)
    level = CoordinateManager(random_sites(4), keep_tables=True).level(1)
    table, plan = level.table, level.plan
    assert isinstance(plan, LinePlan) and plan.n_blocks > 2
    seen = torch.full_like(table, -1)
    centre_rows = []
    for b in plan.buckets:
        assert b.cols == sorted(b.cols) and all(c // 3 == b.line for c in b.cols)
        idx = b.idx.view(-1, b.k)
        for p, c in enumerate(b.cols):
            assert bool((seen[b.rows, c] == -1).all())  # no entry twice
            seen[b.rows, c] = idx[:, p]
        if b.line == LinePlan.CENTRE_LINE:
            centre_rows.append(b.rows)
            for t in range(plan.n_blocks):
                r0, r1 = b.bounds[t], b.bounds[t + 1]
                if r1 > r0:
                    assert b.rows[r0:r1].tolist() == list(range(b.starts[t], b.starts[t] + r1 - r0))
    assert torch.equal(seen, table)  # every present entry, and only those
    assert torch.equal(torch.cat(centre_rows).sort().values, torch.arange(level.n))
    # a block's rows never reach into another block: tasks write disjoint rows
    size = -(-level.n // plan.n_blocks)
    for b in plan.buckets:
        for t in range(plan.n_blocks):
            rows = b.rows[b.bounds[t]:b.bounds[t + 1]]
            assert bool(((rows // size) == t).all())


def test_every_set_runs_without_buckets_off_the_cpu():
    assert kernel_map.default_offset_major_sites(torch.device("cpu")) == kernel_map.OFFSET_MAJOR_SITES < 10**6
    assert kernel_map.default_offset_major_sites(torch.device("cuda")) >= 2**62
    assert CoordinateManager(random_sites(9, extent=8)).offset_major_sites == kernel_map.OFFSET_MAJOR_SITES


def test_row_blocks_hold_each_pair_once_in_the_block_of_its_row():
    """Blocks of a side's rows, counted by hand: every pair of every offset falls in the block
    that holds its row on that side, and the blocks' work (pairs plus a centre row each) is
    balanced; a side whose rows do not increase within an offset's pairs has no blocks."""
    torch.manual_seed(3)
    table = torch.full((40, 27), -1, dtype=torch.int64)
    for r in range(40):
        table[r, 13] = r
        for i in (0, 4, 22):
            if r + i - 13 in range(40) and (r * 7 + i) % 3:
                table[r, i] = r + i - 13  # one fixed shift per offset, as on a coordinate-ordered set
    plan = OffsetPlan.from_table(table, 40, centre=13)
    for side in ("out", "in"):
        rows = plan.out_rows if side == "out" else plan.in_rows
        bounds, cuts = plan.row_blocks(side, 3)
        assert bounds[0] == 0 and bounds[-1] == 40 and bounds == sorted(bounds)
        for j, (a, b) in enumerate(zip(plan.seg[:-1], plan.seg[1:])):
            assert cuts[j][0] == a and cuts[j][-1] == b
            for t in range(3):
                block = rows[cuts[j][t]:cuts[j][t + 1]].tolist()
                assert all(bounds[t] <= r < bounds[t + 1] for r in block)
        work = [bounds[t + 1] - bounds[t] + sum(cuts[j][t + 1] - cuts[j][t] for j in range(len(plan.offsets)))
                for t in range(3)]
        total = 40 + plan.seg[-1]
        assert max(work) <= total / 3 + 4  # a block ends at most one row (1 + 3 pairs) past its share
    shuffled = OffsetPlan(plan.n_out, plan.n_in, plan.K, plan.centre, plan.offsets, plan.seg, plan.out_rows,
                          plan.in_rows.flip(0))
    assert shuffled.row_blocks("in", 2) is None and shuffled.row_blocks("out", 2) is not None


def test_offset_plans_with_large_products_run_in_blocks(monkeypatch):
    """The blocked path is chosen by the size of the product matrix it avoids; its blocks are as
    many as the pairs ask for, and at least one per worker."""
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 10**9)
    coords = random_sites(10)
    x = SparseTensor(torch.randn(len(coords), 8), coords, reorder=True)
    plan = x.manager.level(1).plan
    feats = torch.randn(plan.n_in, 8)
    monkeypatch.setattr(ops, "BLOCKED_PRODUCTS_BYTES", plan.seg[-1] * 8 * 4 + 1)
    assert ops._row_blocks(plan, "out", 8, feats) is None
    monkeypatch.setattr(ops, "BLOCKED_PRODUCTS_BYTES", plan.seg[-1] * 8 * 4)
    assert ops._row_blocks(plan, "out", 8, feats) is not None
    assert ops._row_blocks(plan, "out", 8, feats.bfloat16()) is None  # half precision sums in float32 instead
    monkeypatch.setattr(ops, "BLOCK_PAIRS", -(-plan.seg[-1] // 3))  # the pairs ask for 3 blocks
    assert len(ops._row_blocks(plan, "out", 8, feats)[0]) - 1 == 3
    monkeypatch.setattr(ops, "worker_count", lambda device: 5)  # more workers than that: one block each
    assert len(ops._row_blocks(plan, "out", 8, feats)[0]) - 1 == 5


def test_table_plans_are_for_devices_other_than_the_cpu():
    assert kernel_map.uses_table_plans(torch.device("cuda")) and not kernel_map.uses_table_plans("cpu")


@pytest.mark.parametrize("plan_type,blocked", [(OffsetPlan, False), (OffsetPlan, True), (LinePlan, False)])
def test_result_is_the_same_on_one_and_two_workers(monkeypatch, plan_type, blocked):
    """Offset plans add the per-offset products in one fixed order after all tasks, or in
    blocks of rows (as many as the pairs ask for, at least two) that each add their rows'
    terms in plan order; a line plan's blocks write disjoint rows and their weight gradients
    are added in block order. So the result and both gradients are bit-identical whichever
    worker ran what."""
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 10**9 if plan_type is OffsetPlan else 0)
    monkeypatch.setattr(ops, "BLOCKED_PRODUCTS_BYTES", 0 if blocked else 1 << 62)
    monkeypatch.setattr(ops, "BLOCK_PAIRS", 500)
    monkeypatch.setattr(kernel_map, "LINE_PLAN_PADDING", -1.0)
    monkeypatch.setattr(kernel_map, "LINE_BLOCK_PAIRS", 2000)
    torch.manual_seed(6)
    coords = random_sites(10)
    feats = torch.randn(len(coords), 8)
    conv = SparseConv(8, 8, 3)
    g = torch.randn(len(coords), 8)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            f = feats.clone().requires_grad_()
            x = SparseTensor(f, coords, reorder=True)
            plan = x.manager.level(1).plan
            assert isinstance(plan, plan_type) and (plan_type is OffsetPlan or plan.n_blocks > 2)
            out = conv(x).F
            gx, gw = torch.autograd.grad((out * g).sum(), (f, conv.kernel))
            results.append((out, gx, gw))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_table_plans_run_a_convolution_in_one_gemm_forward_and_two_backward(monkeypatch):
    """The GPU's default scheme: each convolution, stride 1, stride 2 or transposed, is one
    GEMM forward and one per gradient backward, whatever the number of offsets present."""
    monkeypatch.setattr(kernel_map, "OFFSET_MAJOR_SITES", 10**9)
    monkeypatch.setattr(kernel_map, "uses_table_plans", lambda device: True)
    coords = random_sites(3)
    f = torch.randn(len(coords), 8, requires_grad=True)
    x = SparseTensor(f, coords)
    convs = [SparseConv(8, 8, 3), SparseConv(8, 6, 2, 2), SparseConvTranspose(6, 4, 2, 2)]
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append("mm") or real_mm(*a, **k))
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: pytest.fail("no batched GEMMs in table plans"))
    y = x
    for conv in convs:
        y = conv(y)
    assert calls == ["mm"] * 3
    assert isinstance(x.manager.level(1).plan, TablePlan) and isinstance(x.manager.down_map(1).up, TablePlan)
    calls.clear()
    y.F.sum().backward()
    assert calls == ["mm"] * 6


def test_table_plan_reads_zeros_for_absent_entries_and_selects_single_entries():
    # 3 output rows over 4 input rows and K = 3 offsets, worked out by hand; the index is
    # offset-major (offset 0 of rows 0, 1, 2, then offset 1, ...), absent entries read input 4
    table = torch.tensor([[2, -1, 0], [-1, -1, 3], [1, 1, -1]])
    plan = TablePlan.from_table(table, 4)
    assert plan.index.tolist() == [2, 4, 1, 4, 4, 1, 0, 3, 4] and plan.select is None
    assert plan.index_mirrored.tolist() == [0, 3, 4, 4, 4, 1, 2, 4, 1]
    assert plan.n_entries == 9
    x = torch.arange(8, dtype=DT).view(4, 2)  # row r = (2r, 2r + 1)
    w = torch.stack([torch.eye(2, dtype=DT), 2 * torch.eye(2, dtype=DT), 3 * torch.eye(2, dtype=DT)])
    # row 0: x[2] + 3 x[0]; row 1: 3 x[3]; row 2: x[1] + 2 x[1]
    assert ops.table_matmul(plan, x, w).tolist() == [[4, 8], [18, 21], [6, 9]]
    # one entry per output row (fine rows reading their parent through their own offset), as a
    # DownMap builds it: row 0 reads input 0 through offset 1, row 1 input 1 through offset 0,
    # row 2 input 0 through offset 2; select = input row * K + offset
    single = TablePlan(3, 2, 3, None, torch.tensor([0 * 3 + 1, 1 * 3 + 0, 0 * 3 + 2]))
    assert single.n_entries == 2 * 3
    assert ops.table_matmul(single, x[:2], w).tolist() == [[0, 2], [2, 3], [0, 3]]


def test_down_map_children_and_parents_worked_out_by_hand(monkeypatch):
    # Fine sites at stride 1 (batch 0): (-1, 0, 0) -> parent (-2, 0, 0), offset 1 (x odd);
    # (0, 1, 1) and (1, 1, 1) -> parent (0, 0, 0), offsets 2 + 4 = 6 and 1 + 2 + 4 = 7;
    # (2, -2, 3) -> parent (2, -2, 2), offset 4 (z odd). Both schemes (the CPU's offset plans,
    # the GPU's table plans forced here) must give these children and parents.
    coords = torch.tensor([[0, -1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1], [0, 2, -2, 3]], dtype=torch.int32)
    expected = {(-1, 0, 0): ((-2, 0, 0), 1), (0, 1, 1): ((0, 0, 0), 6), (1, 1, 1): ((0, 0, 0), 7),
                (2, -2, 3): ((2, -2, 2), 4)}
    for table in (False, True):
        monkeypatch.setattr(kernel_map, "uses_table_plans", lambda device, t=table: t)
        cm = CoordinateManager(coords, offset_major_sites=10**9)
        dm, fine, coarse = cm.down_map(1), cm.level(1), cm.level(2)
        assert coarse.n == 3
        for r in range(4):
            site = tuple(fine.coords[r, 1:].tolist())
            parent = tuple(coarse.coords[int(dm.parent[r]), 1:].tolist())
            assert (parent, int(dm.child_offset[r])) == expected[site]
        if table:  # the up plan selects parent * 8 + offset; the down table reads the zero row n_fine
            assert dm.up.select.tolist() == (dm.parent * 8 + dm.child_offset).tolist() and dm.up.index is None
            down = dm.down.index.view(3, 8)
            assert int((down < 4).sum()) == 4 and bool((down[down >= 4] == 4).all())


class _ThreadProbe(torch.autograd.Function):
    """Identity that records the caller's torch thread count and the worker pool's width."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        _ThreadProbe.seen.append(("forward", torch.get_num_threads(), workers.worker_count(x.device)))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _ThreadProbe.seen.append(("backward", torch.get_num_threads(), workers.worker_count(g.device)))
        return g


@pytest.mark.parametrize("small_below, expected", [(10**9, 1), (0, 2)])
def test_ops_on_small_sets_run_single_threaded_and_the_count_comes_back(monkeypatch, small_below, expected):
    """Between two convolutions on a set below SMALL_SET_SITES the caller's own ops (here an
    identity in place of batch norm) run with one torch thread, forward and backward, while
    the worker pool keeps both; after the forward and after the backward the caller's count
    is 2 again. Sets at or above the limit keep 2 throughout."""
    monkeypatch.setattr(workers, "SMALL_SET_SITES", small_below)
    torch.manual_seed(3)
    coords = random_sites(10)
    conv1, conv2 = SparseConv(4, 4, 3), SparseConv(4, 4, 3)
    before = torch.get_num_threads()
    _ThreadProbe.seen = []
    try:
        torch.set_num_threads(2)
        x = SparseTensor(torch.randn(len(coords), 4, requires_grad=True), coords, reorder=True)
        h = conv1(x)
        h = conv2(h.replace(_ThreadProbe.apply(h.F)))
        workers.restore_caller_threads()  # as the model's forward does at its end
        after_forward = torch.get_num_threads()
        h.F.square().sum().backward()
        after_backward = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert _ThreadProbe.seen == [("forward", expected, 2), ("backward", expected, 2)]
    assert after_forward == after_backward == 2
