"""The torch backend's CPU matrix products (harness.backbones.gemm): numpy's OpenBLAS or torch.mm.

Products of small integers are exact in float32 whatever the order of the sums, so every
expected value here is exact; the float64 references come from plain Python sums."""

import threading

import numpy as np
import pytest
import torch

from harness.backbones import gemm, workers

NUMPY_BLAS = gemm._numpy_openblas() is not None
needs_numpy_blas = pytest.mark.skipif(not NUMPY_BLAS, reason="numpy's BLAS is not an OpenBLAS with per-thread counts")


@pytest.fixture
def restore_choice():
    with gemm.using(gemm.backend()):
        yield


def ints(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).to(dtype)


def python_mm(a, b):
    """(m, k) @ (k, n) by Python sums over lists: the reference shares no code with either library."""
    a, b = a.tolist(), b.tolist()
    return torch.tensor([[sum(a[i][t] * b[t][j] for t in range(len(b))) for j in range(len(b[0]))]
                         for i in range(len(a))], dtype=torch.float64)


def no_torch_mm(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("torch.mm called where numpy's BLAS should multiply")

    monkeypatch.setattr(torch, "mm", fail)


@needs_numpy_blas
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_products_in_every_layout_the_convolutions_use(restore_choice, monkeypatch, dtype):
    assert gemm.select("numpy") == "numpy" and gemm.backend() == "numpy"
    a, b = ints(37, 24, seed=1, dtype=dtype), ints(24, 11, seed=2, dtype=dtype)
    ref = python_mm(a, b)
    no_torch_mm(monkeypatch)
    assert torch.equal(gemm.mm(a, b).double(), ref)
    # a transposed (the weight gradients' g.t()), b transposed (a transposed weight view)
    assert torch.equal(gemm.mm(a.t().contiguous().t(), b).double(), ref)
    assert torch.equal(gemm.mm(a, b.t().contiguous().t()).double(), ref)
    # into rows of a larger tensor, and into a column block of a wider one
    big = torch.full((50, 11), 7.0, dtype=dtype)
    gemm.mm(a, b, out=big[5:42])
    assert torch.equal(big[5:42].double(), ref) and bool((big[:5] == 7).all()) and bool((big[42:] == 7).all())
    wide = torch.zeros((37, 30), dtype=dtype)
    gemm.mm(a, b, out=wide[:, 4:15])
    assert torch.equal(wide[:, 4:15].double(), ref) and not wide[:, :4].any() and not wide[:, 15:].any()
    # a row block and a column block of a gathered matrix (line plans' per-offset slices)
    g = ints(24, 40, seed=3, dtype=dtype)
    assert torch.equal(gemm.mm(g[:, 8:16].t(), ints(24, 5, seed=4, dtype=dtype)).double(),
                       python_mm(g[:, 8:16].t(), ints(24, 5, seed=4, dtype=dtype)))
    # accumulation
    acc = torch.ones((37, 11), dtype=dtype)
    gemm.addmm_(acc, a, b)
    gemm.addmm_(acc, a, b)
    assert torch.equal(acc.double(), 1 + 2 * ref)


@needs_numpy_blas
def test_what_blas_cannot_take_goes_to_torch(restore_choice, monkeypatch):
    gemm.select("numpy")
    a, b = ints(12, 10, seed=5), ints(10, 6, seed=6)
    calls = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *x, **k: calls.append(1) or real(*x, **k))
    # every other row and column: no unit stride in either dimension
    strided = ints(24, 20, seed=7)[::2, ::2]
    assert torch.equal(gemm.mm(strided, b).double(), python_mm(strided, b))
    assert torch.equal(gemm.mm(a.half(), b.half()).double(), python_mm(a, b))  # another dtype
    assert len(calls) == 2
    assert torch.equal(gemm.mm(a, b).double(), python_mm(a, b)) and len(calls) == 2  # this one numpy's


def test_torch_choice_and_bad_names(restore_choice, monkeypatch):
    assert gemm.select("torch") == "torch" and "torch.mm" in gemm.describe()
    a, b = ints(9, 7, seed=8), ints(7, 3, seed=9)
    assert torch.equal(gemm.mm(a, b).double(), python_mm(a, b))
    with pytest.raises(ValueError, match="'blas'.*auto, torch, numpy"):
        gemm.select("blas")
    gemm._STATE["choice"] = None
    monkeypatch.setenv("HARNESS_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="HARNESS_CPU_GEMM"):
        gemm.backend()


def test_numpy_asked_for_without_a_usable_openblas_is_an_error(restore_choice, monkeypatch):
    monkeypatch.setattr(gemm, "_numpy_openblas", lambda: None)
    with pytest.raises(ValueError, match="numpy's BLAS is not an OpenBLAS"):
        gemm.select("numpy")
    assert gemm.select("auto") == "torch" and "not an OpenBLAS" in gemm.describe()


@needs_numpy_blas
def test_the_probe_keeps_torch_unless_numpy_is_clearly_faster(restore_choice, monkeypatch):
    monkeypatch.setattr(gemm, "_probe", lambda np, setter: 1.2)
    assert gemm.select("auto") == "torch" and "1.20x" in gemm.describe()
    monkeypatch.setattr(gemm, "_probe", lambda np, setter: 2.0)
    assert gemm.select("auto") == "numpy" and "2.00x" in gemm.describe()


@needs_numpy_blas
def test_the_probe_leaves_the_random_stream_and_thread_counts_alone(restore_choice):
    _, setter, _ = gemm._numpy_openblas()
    threads = torch.get_num_threads()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    gemm._probe(*gemm._numpy_openblas()[:2])
    assert torch.equal(torch.rand(4), expected)
    assert torch.get_num_threads() == threads
    before = setter(5)  # this thread's OpenBLAS count: set 5, see the probe give it back
    try:
        gemm._probe(*gemm._numpy_openblas()[:2])
        assert setter(5) == 5
    finally:
        setter(before)


@needs_numpy_blas
def test_products_outside_the_workers_give_the_thread_its_blas_count_back(restore_choice):
    gemm.select("numpy")
    _, setter, _ = gemm._numpy_openblas()
    seen = []

    def run():
        setter(3)
        gemm.mm(ints(8, 8), ints(8, 8))
        seen.append(setter(3))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [3]
    assert not workers.on_worker_thread()


@needs_numpy_blas
def test_workers_multiply_side_by_side_with_the_same_results(restore_choice):
    """Products on the worker pool (two threads) equal the exact values, whichever worker ran them."""
    gemm.select("numpy")
    mats = [(ints(64, 48, seed=s), ints(48, 16, seed=s + 100)) for s in range(8)]
    outs = [torch.empty(64, 16) for _ in mats]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers.run_tasks(lambda t, w: gemm.mm(*mats[t], out=outs[t]), len(mats), torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    for (a, b), o in zip(mats, outs):
        assert torch.equal(o.double(), python_mm(a, b))
    assert np.all([o.abs().sum() > 0 for o in outs])


@needs_numpy_blas
def test_using_gives_the_earlier_choice_back(restore_choice):
    gemm.select("torch")
    with gemm.using("numpy") as chosen:
        assert chosen == "numpy" == gemm.backend()
    assert gemm.backend() == "torch" and gemm._NUMPY is None


@needs_numpy_blas
def test_openblas_cores_names_numpys_library_and_its_kernels():
    cores = gemm.openblas_cores()
    numpys = [name for name in cores if "openblas" in name]
    assert numpys and all(cores[name] and cores[name] != "?" for name in numpys)
    assert gemm._numpy_openblas()[2] in cores.values()
