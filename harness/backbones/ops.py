"""Sparse operations of the torch backend, and helpers shared by every backend.

On the CPU, convolutions run as gather -> GEMM -> write per chunk of a bucket of a
:class:`~.kernel_map.Plan` (per offset of an :class:`~.kernel_map.OffsetPlan`, per block of
rows and bucket of a :class:`~.kernel_map.LinePlan`); on a GPU as
one gather and one GEMM through a :class:`~.kernel_map.TablePlan`. The autograd function keeps
only its input, its weight and the (shared) plans, never a gathered matrix. Backward gathers
again: the output gradient, once for both gradients of a stride-1 convolution
(:func:`symmetric_backward`, :func:`table_backward`). Chunks and pieces are
tasks for the worker threads of :mod:`.workers`; everything large they write into is
allocated here, by the calling thread.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from typing import Callable, List, Optional, Tuple

import torch

from . import gemm
from .kernel_map import LinePlan, OffsetPlan, Plan, TablePlan
from .workers import caller_threads_for, run_tasks, worker_count

__all__ = ["plan_matmul", "plan_wgrad_out", "plan_wgrad_in", "symmetric_backward", "offset_matmul",
           "offset_backward", "line_matmul", "line_backward", "table_matmul", "table_backward", "sparse_conv",
           "global_pool"]


# Half-precision dtypes: their scatter-adds accumulate in float32, rounding each row once.
_HALF = (torch.float16, torch.bfloat16)

# An offset plan whose products would fill at least this many bytes runs in blocks of rows
# instead (:func:`_row_blocks`): no product matrix, each block's scatter-adds on a worker while
# its rows are in cache. A product matrix that large is a fresh ``mmap`` at every call (above
# glibc's threshold), whose page faults cost more than the blocks' extra, smaller ops. Measured
# on the 2-core CPU at 100k voxels, fwd / bwd: real-scan stride 4 at 128 channels (130k pairs,
# 67 MB of products) 47 / 80 ms against 29 / 59 ms in blocks, stride 8 at 256 (36k pairs, 37 MB)
# 40 / 67 against 28 / 63; the rooms' stride 4 at 128 (60k pairs, 31 MB, from the heap) 17 /
# 30 against 15 / 34-38: no gain below the threshold.
BLOCKED_PRODUCTS_BYTES = 32 << 20

# Pairs per block of a blocked offset plan; at least two blocks, and at least one per worker (on
# more cores than that, fewer blocks would leave cores idle: then the blocks' grouping of the
# sums, not any row's order of terms, follows the thread count).
BLOCK_PAIRS = 32768


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when it is one already (off the CPU every call
    costs the host a dispatch, and the batched scheme makes a few per group)."""
    return t if t.dtype == dtype else t.to(dtype)


class _Scratch:
    """Per-worker scratch buffers, allocated by the calling thread.

    Worker threads that allocate large temporaries each grow their own malloc arena, which
    kept ~150 MB more resident at 100k voxels; buffers made here and filled with ``out=``
    keep the peak at the single-threaded level."""

    def __init__(self, ref: torch.Tensor, n_workers: int, **sizes: int):
        self.bufs = [{name: ref.new_empty(max(n, 1)) for name, n in sizes.items()} for _ in range(n_workers)]

    def get(self, worker: int, name: str, shape) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return self.bufs[worker][name][:n].view(shape)


def _gather(x: torch.Tensor, b, r0: int, r1: int, buf: torch.Tensor) -> torch.Tensor:
    """Rows r0..r1 of bucket ``b`` gathered from ``x`` into ``buf`` as (rows, k * C), absent
    entries zero."""
    k = b.k
    g = buf[:(r1 - r0) * k * x.shape[1]].view((r1 - r0) * k, x.shape[1])
    torch.index_select(x, 0, b.idx[r0 * k:r1 * k], out=g)
    miss = b.missing[r0 // b.step]
    if miss is not None:
        g.index_fill_(0, miss, 0)
    return g.view(r1 - r0, k * x.shape[1])


def _rows(t: torch.Tensor, b, r0: int, r1: int, scratch: _Scratch, worker: int, name: str) -> torch.Tensor:
    """Rows r0..r1 of bucket ``b`` of a row-aligned tensor (a slice, or gathered into scratch)."""
    if b.rows is None:
        return t[b.start + r0:b.start + r1]
    out = scratch.get(worker, name, (r1 - r0, t.shape[1]))
    return torch.index_select(t, 0, b.rows[r0:r1], out=out)


def plan_matmul(plan: Plan, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_i x[table[r, i]] @ weight[i]`` for a (K, C, C_out) weight.

    One task per chunk (gather -> GEMM -> write of disjoint output rows); tasks run on the
    worker threads (see :mod:`.workers`)."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    out = x.new_empty((plan.n_out, c_out)) if plan.covers_all else x.new_zeros((plan.n_out, c_out))
    n_workers = worker_count(x.device)
    scratch = _Scratch(x, n_workers, g=plan.max_entries * c_in, y=plan.max_rows * c_out)
    slices = _WeightSlices(weight, n_workers)

    def task(t: int, w: int) -> None:
        bi, r0, r1 = plan.chunks[t]
        b = plan.buckets[bi]
        wb = slices.get(w, bi, b)
        g = _gather(x, b, r0, r1, scratch.bufs[w]["g"])
        if b.rows is None:
            gemm.mm(g, wb, out=out[b.start + r0:b.start + r1])
        else:
            y = scratch.get(w, "y", (r1 - r0, c_out))
            out.index_copy_(0, b.rows[r0:r1], gemm.mm(g, wb, out=y))

    run_tasks(task, len(plan.chunks), x.device)
    if plan.spill is not None:
        out = _scatter_sum(out, plan.spill, "out", _offset_tasks(plan.spill, x, plan.spill.in_rows, weight, []))
    return out


def _piece_chunks(b, r0: int, r1: int):
    for c0 in range(r0, r1, b.step):
        yield c0, min(r1, c0 + b.step)


def _weight_grad_tasks(plan: Plan, ref: torch.Tensor, block: Tuple[int, int], body, cols_of) -> torch.Tensor:
    """Run ``body(piece, worker, acc)`` for every piece of ``plan``, ``acc`` being a (k *
    block[0], block[1]) matrix for the piece's bucket of k offsets, and add each accumulator
    into a (K, *block) gradient at rows ``cols_of(bucket)`` (see :func:`_accumulated`)."""
    return _accumulated(plan.K, len(plan.pieces), lambda t: plan.buckets[plan.pieces[t][0]].k,
                        lambda t: cols_of(plan.buckets[plan.pieces[t][0]]), ref, block, body)


def _accumulated(K: int, n_pieces: int, k_of, cols_of, ref: torch.Tensor, block: Tuple[int, int],
                 body) -> torch.Tensor:
    """Run ``body(piece, worker, acc)`` for pieces ``0 .. n_pieces - 1``, ``acc`` being a
    (k_of(piece) * block[0], block[1]) matrix, and add each accumulator into a (K, *block)
    gradient at rows ``cols_of(piece)``: one contiguous block per offset, so the add is a
    plain row-wise ``index_add_`` (on a transposed view it was ten times slower).

    Accumulators are a few slots allocated here (by the calling thread) and reused: a worker
    takes a free slot, then the next piece, computes it, and whichever worker is free adds
    the finished pieces into the gradient in piece order (the same sums in the same order on
    any number of workers; no barrier between pieces). The adds run on the single-threaded
    workers: on the calling thread each was an OpenMP region whose idle partner thread then
    spun for a while, taking CPU from the workers."""
    n_workers = worker_count(ref.device)
    n_slots = max(1, min(n_pieces, 2 * n_workers))
    kmax = max((k_of(t) for t in range(n_pieces)), default=1)
    per_offset = block[0] * block[1]
    slots = [ref.new_empty(kmax * per_offset) for _ in range(n_slots)]
    acc_all = ref.new_zeros((K,) + tuple(block))
    free: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    for i in range(n_slots):
        free.put(i)
    counter = itertools.count()
    pending: dict = {}  # finished piece -> its slot
    nxt = [0]  # next piece to add
    add_lock = threading.Lock()
    failed = []

    def drain() -> None:
        # Only one thread adds at a time; a thread that finds the lock taken leaves its piece
        # to the holder, which looks again after releasing.
        while add_lock.acquire(blocking=False):
            try:
                while nxt[0] in pending:
                    t = nxt[0]
                    slot = pending.pop(t)
                    k = k_of(t)
                    acc_all.view(K, per_offset).index_add_(0, cols_of(t), slots[slot][:k * per_offset].view(k, per_offset))
                    nxt[0] = t + 1
                    free.put(slot)
            finally:
                add_lock.release()
            if nxt[0] not in pending:
                return

    def loop(_: int, w: int) -> None:
        while True:
            slot = free.get()  # a slot first, then a piece: the lowest unfinished piece always has a slot
            t = next(counter)
            if failed or t >= n_pieces:
                free.put(slot)
                return
            try:
                k = k_of(t)
                body(t, w, slots[slot][:k * per_offset].view(k * block[0], block[1]))
            except BaseException:
                failed.append(True)
                free.put(slot)  # lets a worker waiting for a slot see the failure and stop
                raise
            pending[t] = slot
            drain()

    run_tasks(loop, min(n_workers, max(n_pieces, 1)), ref.device)
    return acc_all


def _accumulate(acc: torch.Tensor, first: bool, a: torch.Tensor, b: torch.Tensor) -> None:
    if first:
        gemm.mm(a, b, out=acc)
    else:
        gemm.addmm_(acc, a, b)


class _WeightSlices:
    """``weight[cols of bucket]`` as a (k * C_in, C_out) matrix, cached per worker for the
    bucket it is working on (chunks of one bucket are consecutive tasks)."""

    def __init__(self, weight: torch.Tensor, n_workers: int):
        self.weight = weight
        self.cur = [(-1, None)] * n_workers

    def get(self, w: int, bi: int, b) -> torch.Tensor:
        if self.cur[w][0] != bi:
            k, c_in, c_out = b.k, self.weight.shape[1], self.weight.shape[2]
            self.cur[w] = (bi, self.weight.index_select(0, b.cols).view(k * c_in, c_out))
        return self.cur[w][1]


def plan_wgrad_out(plan: Plan, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Weight gradient from the output side: ``dW[i] = sum_r x[table[r, i]]^T grad[r]``."""
    c_in, c_out = x.shape[1], grad.shape[1]
    scratch = _Scratch(x, worker_count(x.device), g=plan.max_entries * c_in, go=plan.max_rows * c_out)

    def body(t: int, w: int, acc: torch.Tensor) -> None:  # acc (k * C_in, C_out)
        bi, p0, p1 = plan.pieces[t]
        b = plan.buckets[bi]
        for r0, r1 in _piece_chunks(b, p0, p1):
            g = _gather(x, b, r0, r1, scratch.bufs[w]["g"])
            _accumulate(acc, r0 == p0, g.t(), _rows(grad, b, r0, r1, scratch, w, "go"))

    gw = _weight_grad_tasks(plan, grad, (c_in, c_out), body, lambda b: b.cols)
    if plan.spill is not None:
        _, gw = offset_backward(plan.spill, x, None, grad, False, True, gw_base=gw)
    return gw


def plan_wgrad_in(plan: Plan, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Weight gradient from the input side, ``plan`` being over the rows of ``x``:
    ``dW[i] = sum_r x[r]^T grad[table[r, i]]``."""
    c_in, c_out = x.shape[1], grad.shape[1]
    scratch = _Scratch(x, worker_count(x.device), g=plan.max_entries * c_out, xi=plan.max_rows * c_in)

    def body(t: int, w: int, acc: torch.Tensor) -> None:  # acc (k * C_out, C_in): dW^T per offset
        bi, p0, p1 = plan.pieces[t]
        b = plan.buckets[bi]
        for r0, r1 in _piece_chunks(b, p0, p1):
            g = _gather(grad, b, r0, r1, scratch.bufs[w]["g"])
            _accumulate(acc, r0 == p0, g.t(), _rows(x, b, r0, r1, scratch, w, "xi"))

    return _weight_grad_tasks(plan, grad, (c_out, c_in), body, lambda b: b.cols).transpose(1, 2).contiguous()


def symmetric_backward(plan: Plan, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_x: bool,
                       need_w: bool):
    """Both gradients of a stride-1 conv with a symmetric (odd) kernel from one gather.

    The transposed map of offset i is offset K-1-i of the same table, so per chunk the
    gathered output gradient ``G[q] = [grad[table[q, j]]]_j`` serves the input gradient
    (``G @ W[K-1-j]^T``) and the weight gradient (``G^T x[q]`` is ``dW[K-1-j]^T``); x is never
    gathered again. Tasks are the plan's pieces (whole chunks of one bucket).
    """
    K, c_in, c_out = weight.shape
    n_workers = worker_count(grad.device)
    gx = grad.new_empty((plan.n_out, c_in)) if need_x else None
    wt = weight.flip(0).transpose(1, 2).contiguous() if need_x else None  # wt[j] = W[K-1-j]^T
    slices = _WeightSlices(wt, n_workers) if need_x else None
    scratch = _Scratch(grad, n_workers, g=plan.max_entries * c_out, y=plan.max_rows * c_in, xi=plan.max_rows * c_in)

    def body(t: int, w: int, acc: Optional[torch.Tensor]) -> None:  # acc (k * C_out, C_in): dW^T per offset
        bi, p0, p1 = plan.pieces[t]
        b = plan.buckets[bi]
        wb = slices.get(w, bi, b) if need_x else None
        for r0, r1 in _piece_chunks(b, p0, p1):
            g = _gather(grad, b, r0, r1, scratch.bufs[w]["g"])
            if need_x:
                if b.rows is None:
                    gemm.mm(g, wb, out=gx[b.start + r0:b.start + r1])
                else:
                    y = scratch.get(w, "y", (r1 - r0, c_in))
                    gx.index_copy_(0, b.rows[r0:r1], gemm.mm(g, wb, out=y))
            if need_w:
                _accumulate(acc, r0 == p0, g.t(), _rows(x, b, r0, r1, scratch, w, "xi"))

    gw = None
    if need_w:
        gw = _weight_grad_tasks(plan, grad, (c_out, c_in), body, lambda b: K - 1 - b.cols).transpose(1, 2).contiguous()
    else:
        run_tasks(lambda t, w: body(t, w, None), len(plan.pieces), grad.device)
    if plan.spill_t is not None:
        # a spilled pair (q, j) is the entry the buckets lack for row q's input gradient and
        # offset K-1-j's weight gradient: the offset backward of the transposed pairs adds both
        gx, gw = offset_backward(plan.spill_t, x, weight, grad, need_x, need_w, gx_base=gx, gw_base=gw)
    return gx, gw


def _pair_rows(src: torch.Tensor, rows: torch.Tensor, scratch: _Scratch, w: int, name: str, a: int,
               b: int) -> torch.Tensor:
    """Pairs a..b of ``src[rows]``, gathered into worker ``w``'s scratch buffer ``name``."""
    return torch.index_select(src, 0, rows[a:b], out=scratch.get(w, name, (b - a, src.shape[1])))


def _offset_tasks(plan: OffsetPlan, src: torch.Tensor, src_rows: torch.Tensor, weight: Optional[torch.Tensor],
                  first: List[Callable[[], None]], after=None) -> Optional[torch.Tensor]:
    """Tasks ``first`` (the centre offset's products: no gather), then one task per offset i,
    most pairs first: gather ``src[src_rows[pairs of i]]``, write its product with
    ``weight[i]`` into that offset's rows of the returned (P, C_out) matrix (none when
    ``weight`` is None), then ``after(i, a, b, gathered, worker)``."""
    n_workers = worker_count(src.device)
    c_in = src.shape[1]
    prods = None if weight is None else src.new_empty((plan.seg[-1], weight.shape[2]))
    scratch = _Scratch(src, n_workers, g=plan.max_pairs * c_in)
    n_first = len(first)

    def task(t: int, w: int) -> None:
        if t < n_first:
            first[t]()
            return
        j = t - n_first
        i, a, b = plan.offsets[j], plan.seg[j], plan.seg[j + 1]
        g = _pair_rows(src, src_rows, scratch, w, "g", a, b)
        if prods is not None:
            gemm.mm(g, weight[i], out=prods[a:b])
        if after is not None:
            after(i, a, b, g, w)

    run_tasks(task, n_first + len(plan.offsets), src.device)
    return prods


def _centre_parts(plan: OffsetPlan, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> List[Callable[[], None]]:
    """``out = a @ w[centre]`` as tasks of about as many rows as the largest other offset has
    pairs, so that no single task holds the workers up at the end (none without a centre).
    The same cut on any number of workers: a BLAS may pick its kernels by a product's size
    (OpenBLAS has its own for small ones), so the cut must not follow the thread count for the
    result to stay bit for bit the same."""
    if plan.centre is None:
        return []
    rows = max(plan.max_pairs, 256)
    return [lambda r0=r0, r1=min(plan.n_out, r0 + rows): gemm.mm(a[r0:r1], w[plan.centre], out=out[r0:r1])
            for r0 in range(0, plan.n_out, rows)]


def _scatter_sum(base: torch.Tensor, plan: OffsetPlan, side: str, prods: torch.Tensor) -> torch.Tensor:
    """``base`` plus the rows of ``prods`` added at the plan's ``side`` ("out" or "in") rows:
    one ``index_add_`` in a fixed order, after all tasks, so the sum does not depend on which
    worker ran what. Half precision adds in float32 on the rows it touches (a bucket plan's
    spill touches a third of them), rounding each once."""
    rows = plan.out_rows if side == "out" else plan.in_rows
    if base.dtype not in _HALF:
        return base.index_add_(0, rows, _as(prods, base.dtype))
    touched, local = plan.out_touched if side == "out" else plan.in_touched
    acc = base.index_select(0, touched).float().index_add_(0, local, prods.float())
    return base.index_copy_(0, touched, acc.to(base.dtype))


def _row_blocks(plan: OffsetPlan, side: str, width: int, ref: torch.Tensor):
    """``plan.row_blocks`` for products ``width`` wide when they would fill at least
    BLOCKED_PRODUCTS_BYTES, else None (also in half precision, whose sums go through float32)."""
    if ref.dtype in _HALF or plan.seg[-1] * width * ref.element_size() < BLOCKED_PRODUCTS_BYTES:
        return None
    return plan.row_blocks(side, max(2, worker_count(ref.device), -(-plan.seg[-1] // BLOCK_PAIRS)))


def offset_matmul(plan: OffsetPlan, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out = x @ W[centre] + sum_i scatter(x[in_i] @ W[i], out_i)``."""
    shape = (plan.n_out, weight.shape[2])
    blocks = _row_blocks(plan, "out", weight.shape[2], x)
    if blocks is not None:
        return _blocked_matmul(plan, blocks, x, weight)
    out = x.new_empty(shape) if plan.centre is not None else x.new_zeros(shape)
    prods = _offset_tasks(plan, x, plan.in_rows, weight, _centre_parts(plan, x, weight, out))
    return _scatter_sum(out, plan, "out", prods)


def _blocked_matmul(plan: OffsetPlan, blocks, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`offset_matmul` by blocks of output rows, one task each: the centre's product
    written, then per offset gather -> GEMM -> ``index_add_`` of the block's pairs. Every row
    sums its terms in the plan's order, whichever worker runs its block."""
    bounds, cuts = blocks
    c_in, c_out = x.shape[1], weight.shape[2]
    out = x.new_empty((plan.n_out, c_out))
    scratch = _Scratch(x, worker_count(x.device), g=plan.max_pairs * c_in, y=plan.max_pairs * c_out)

    def task(t: int, w: int) -> None:
        r0, r1 = bounds[t], bounds[t + 1]
        if plan.centre is not None:
            gemm.mm(x[r0:r1], weight[plan.centre], out=out[r0:r1])
        else:
            out[r0:r1].zero_()
        for j, i in enumerate(plan.offsets):
            a, b = cuts[j][t], cuts[j][t + 1]
            if b > a:
                g = _pair_rows(x, plan.in_rows, scratch, w, "g", a, b)
                out.index_add_(0, plan.out_rows[a:b], gemm.mm(g, weight[i], out=scratch.get(w, "y", (b - a, c_out))))

    run_tasks(task, len(bounds) - 1, x.device)
    return out


def offset_backward(plan: OffsetPlan, x: torch.Tensor, weight: Optional[torch.Tensor], grad: torch.Tensor,
                    need_x: bool, need_w: bool, gx_base: Optional[torch.Tensor] = None,
                    gw_base: Optional[torch.Tensor] = None):
    """Both gradients of an offset-major convolution: per offset one gather of the output
    gradient serves the input gradient (``grad[out_i] @ W[i]^T``, added at ``in_i``) and the
    weight gradient (``x[in_i]^T grad[out_i]``, a block of its own: nothing to accumulate).
    With ``gx_base`` / ``gw_base`` (a bucket plan's gradients, for its spilled pairs; no
    centre) both are added into those tensors instead; ``weight`` is needed only for the
    input gradient."""
    c_in = x.shape[1]
    wt = weight.transpose(1, 2) if need_x else None  # a view: the GEMMs read it transposed, no copy
    blocks = _row_blocks(plan, "in", c_in, grad) if gx_base is None and gw_base is None else None
    if blocks is not None:
        return _blocked_backward(plan, blocks, x, wt, grad, need_x, need_w)
    gx = gx_base
    if need_x and gx is None:
        gx = grad.new_empty((plan.n_in, c_in)) if plan.centre is not None else grad.new_zeros((plan.n_in, c_in))
    gw = gw_base
    if need_w and gw is None:
        gw = torch.zeros_like(weight)
    scratch = _Scratch(x, worker_count(grad.device), xi=plan.max_pairs * c_in) if need_w else None
    first = _centre_parts(plan, grad, wt, gx) if need_x else []
    if need_w and plan.centre is not None:
        first.append(lambda: gemm.mm(x.t(), grad, out=gw[plan.centre]))

    def weight_grad(i: int, a: int, b: int, g: torch.Tensor, w: int) -> None:
        xi = _pair_rows(x, plan.in_rows, scratch, w, "xi", a, b)
        if gw_base is None:
            gemm.mm(xi.t(), g, out=gw[i])
        else:
            gemm.addmm_(gw[i], xi.t(), g)

    prods = _offset_tasks(plan, grad, plan.out_rows, wt, first, weight_grad if need_w else None)
    return (_scatter_sum(gx, plan, "in", prods) if need_x else None), gw


def _blocked_backward(plan: OffsetPlan, blocks, x: torch.Tensor, wt: Optional[torch.Tensor], grad: torch.Tensor,
                      need_x: bool, need_w: bool):
    """:func:`offset_backward` by blocks of input rows, one task each: per offset one gather of
    the block's output-gradient rows serves its input gradient (added into the block's rows)
    and its share of the weight gradient, the blocks' shares summed in block order (see
    :func:`_accumulated`)."""
    bounds, cuts = blocks
    K, c_in, c_out = plan.K, x.shape[1], grad.shape[1]
    n_blocks = len(bounds) - 1
    gx = grad.new_empty((plan.n_in, c_in)) if need_x else None
    scratch = _Scratch(grad, worker_count(grad.device), g=plan.max_pairs * c_out, y=plan.max_pairs * c_in,
                       xi=plan.max_pairs * c_in)
    unused = sorted(set(range(K)) - set(plan.offsets) - {plan.centre})

    def body(t: int, w: int, acc: Optional[torch.Tensor]) -> None:  # acc (K * C_in, C_out): this block's dW
        q0, q1 = bounds[t], bounds[t + 1]
        dw = acc.view(K, c_in, c_out) if acc is not None else None
        if plan.centre is not None:  # the centre reads row q at row q
            if need_x:
                gemm.mm(grad[q0:q1], wt[plan.centre], out=gx[q0:q1])
            if dw is not None:
                gemm.mm(x[q0:q1].t(), grad[q0:q1], out=dw[plan.centre])
        elif need_x:
            gx[q0:q1].zero_()
        if dw is not None:
            for i in unused:
                dw[i].zero_()
        for j, i in enumerate(plan.offsets):
            a, b = cuts[j][t], cuts[j][t + 1]
            if b == a:
                if dw is not None:
                    dw[i].zero_()
                continue
            g = _pair_rows(grad, plan.out_rows, scratch, w, "g", a, b)
            if need_x:
                gx.index_add_(0, plan.in_rows[a:b], gemm.mm(g, wt[i], out=scratch.get(w, "y", (b - a, c_in))))
            if dw is not None:
                gemm.mm(_pair_rows(x, plan.in_rows, scratch, w, "xi", a, b).t(), g, out=dw[i])

    gw = None
    if need_w:
        every = torch.arange(K, device=grad.device)
        gw = _accumulated(K, n_blocks, lambda t: K, lambda t: every, grad, (c_in, c_out), body)
    else:
        run_tasks(lambda t, w: body(t, w, None), n_blocks, grad.device)
    return gx, gw


def _line_weights(plan: LinePlan, weight: torch.Tensor) -> List[torch.Tensor]:
    """``weight[cols]`` of each bucket as a (k * C, C_out) matrix: a view where the offsets
    are consecutive."""
    K, c_in, c_out = weight.shape
    return [weight[b.cols[0]:b.cols[0] + b.k].view(b.k * c_in, c_out) if b.consecutive
            else weight[b.cols].reshape(b.k * c_in, c_out) for b in plan.buckets]


class _LineSum:
    """The (n, C) sum of a line plan's products over the lines of each row: the centre line's
    GEMMs write their rows, the other lines' add into them. Half-precision products are summed
    in float32 (a row has up to 9 lines) and rounded once, by :meth:`result`."""

    def __init__(self, ref: torch.Tensor, n: int, c: int, scratch: _Scratch):
        self.dtype, self.half = ref.dtype, ref.dtype in _HALF
        self.t = ref.new_empty((n, c), dtype=torch.float32 if self.half else ref.dtype)
        self.c, self.scratch = c, scratch

    def add(self, b, t: int, r0: int, r1: int, g: torch.Tensor, wb: torch.Tensor, w: int) -> None:
        """Rows r0..r1 of bucket ``b`` (block ``t``): ``g @ wb``, written or added."""
        if b.starts is not None and not self.half:
            s0 = b.starts[t]
            gemm.mm(g, wb, out=self.t[s0:s0 + r1 - r0])
            return
        y = gemm.mm(g, wb, out=self.scratch.get(w, "y", (r1 - r0, self.c)))
        if b.starts is not None:
            self.t[b.starts[t]:b.starts[t] + r1 - r0].copy_(y)
        else:
            self.t.index_add_(0, b.rows[r0:r1], y.float() if self.half else y)

    def result(self) -> torch.Tensor:
        return self.t.to(self.dtype) if self.half else self.t


def _line_gather(src: torch.Tensor, b, r0: int, r1: int, scratch: _Scratch, w: int) -> torch.Tensor:
    """Rows r0..r1 of line bucket ``b`` gathered from ``src`` as (rows, k * C)."""
    k, c = b.k, src.shape[1]
    g = scratch.get(w, "g", ((r1 - r0) * k, c))
    torch.index_select(src, 0, b.idx[r0 * k:r1 * k], out=g)
    return g.view(r1 - r0, k * c)


def line_matmul(plan: LinePlan, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_i x[table[r, i]] @ weight[i]`` through a line plan: one task per block
    of rows, per bucket one gather, one GEMM, one write or add of its rows."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    scratch = _Scratch(x, worker_count(x.device), g=plan.max_rows * 3 * c_in, y=plan.max_rows * c_out)
    out = _LineSum(x, plan.n, c_out, scratch)
    weights = _line_weights(plan, weight)

    def task(t: int, w: int) -> None:
        for b, wb in zip(plan.buckets, weights):
            r0, r1 = b.bounds[t], b.bounds[t + 1]
            if r1 > r0:
                out.add(b, t, r0, r1, _line_gather(x, b, r0, r1, scratch, w), wb, w)

    run_tasks(task, plan.n_blocks, x.device)
    return out.result()


def line_backward(plan: LinePlan, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_x: bool,
                  need_w: bool):
    """Both gradients of a line-plan convolution from one gather of the output gradient per
    bucket and block, as :func:`symmetric_backward` does for buckets: through offset j the
    gathered ``grad`` rows serve row q's input gradient (with ``W[K-1-j]^T``) and offset
    K-1-j's weight gradient (``G_j^T x[q]``). Each block accumulates its own (K, C_out, C_in)
    sums by j (a bucket's offsets are consecutive there, so one GEMM adds them all), added
    into offset K-1-j's gradient in block order."""
    K, c_in, c_out = weight.shape
    n_workers = worker_count(grad.device)
    scratch = _Scratch(grad, n_workers, g=plan.max_rows * 3 * c_out, y=plan.max_rows * c_in,
                       xi=plan.max_rows * c_in)
    gx = _LineSum(grad, plan.n, c_in, scratch) if need_x else None
    weights = _line_weights(plan, weight.flip(0).transpose(1, 2).contiguous()) if need_x else None  # W[K-1-j]^T

    def body(t: int, w: int, acc: Optional[torch.Tensor]) -> None:  # acc (K * C_out, C_in): dW[K-1-j]^T at j
        if acc is not None:
            acc.zero_()
        for bi, b in enumerate(plan.buckets):
            r0, r1 = b.bounds[t], b.bounds[t + 1]
            if r1 == r0:
                continue
            g = _line_gather(grad, b, r0, r1, scratch, w)
            if need_x:
                gx.add(b, t, r0, r1, g, weights[bi], w)
            if acc is not None:
                if b.starts is not None:
                    xr = x[b.starts[t]:b.starts[t] + r1 - r0]
                else:
                    xr = torch.index_select(x, 0, b.rows[r0:r1], out=scratch.get(w, "xi", (r1 - r0, c_in)))
                if b.consecutive:
                    c0 = b.cols[0]
                    gemm.addmm_(acc[c0 * c_out:(c0 + b.k) * c_out], g.t(), xr)
                else:
                    for p, col in enumerate(b.cols):
                        gemm.addmm_(acc[col * c_out:(col + 1) * c_out], g[:, p * c_out:(p + 1) * c_out].t(), xr)

    gw = None
    if need_w:
        mirrored = torch.arange(K - 1, -1, -1, device=grad.device)
        gw = _accumulated(K, plan.n_blocks, lambda t: K, lambda t: mirrored, grad, (c_out, c_in), body)
        gw = gw.transpose(1, 2).contiguous()
    else:
        run_tasks(lambda t, w: body(t, w, None), plan.n_blocks, grad.device)
    return (gx.result() if need_x else None), gw


@functools.lru_cache(maxsize=64)
def _zero_column(height: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (height, 1) column of zeros, made once per process and never written."""
    return torch.zeros((height, 1), dtype=dtype, device=device)


def _table_cols(src: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(C * K, n_rows), channel-major: ``cols[c * K + i, r] = src[index[i * n_rows + r], c]``,
    zeros where the index points past ``src`` (absent entries). One ``cat`` reads the
    transposed features in place and appends the zero column (one launch)."""
    c = src.shape[1]
    padded = torch.cat([src.t(), _zero_column(c, src.dtype, src.device)], dim=1)  # (C, n_in + 1)
    return padded.index_select(1, index).view(-1, n_rows)


def table_matmul(plan: TablePlan, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_i x[table[r, i]] @ weight[i]`` for a (K, C, C_out) weight, as one gather
    and one GEMM (see :class:`~.kernel_map.TablePlan`)."""
    K, c_in, c_out = weight.shape
    if plan.select is not None:
        prods = torch.mm(x, weight.permute(1, 0, 2).reshape(c_in, K * c_out))  # (n_in, K * C_out)
        return prods.view(-1, c_out).index_select(0, plan.select)
    cols = _table_cols(x, plan.index, plan.n_out)  # (C * K, n_out)
    return torch.mm(cols.t(), weight.permute(1, 0, 2).reshape(c_in * K, c_out))


def table_backward(fwd: TablePlan, bwd: Optional[TablePlan], x: torch.Tensor, weight: torch.Tensor,
                   grad: torch.Tensor, need_x: bool, need_w: bool):
    """Both gradients of a table-plan convolution, with one gather where both are needed.

    Where the output gradient is gathered through the transposed table, ``cols'`` (C_out * K,
    n_in), one gather serves both: ``gx = cols'^T @ W'`` and ``gW = cols' @ x``. The transposed
    table is ``bwd``'s, or for a stride-1 kernel (``bwd`` None) the forward table with its
    offsets reversed (``TablePlan.index_mirrored``: the neighbour through offset i reads back
    through offset K-1-i). Where ``bwd`` selects (stride 2), the input gradient gathers nothing
    and the weight gradient is ``cols(x) @ grad``."""
    K, c_in, c_out = weight.shape
    gx = gw = None
    if need_x and (bwd is None or bwd.select is None):  # stride 1, or the transposed convolution
        index = fwd.index_mirrored if bwd is None else bwd.index
        cols = _table_cols(grad, index, x.shape[0])  # (c_out * K, n_in)
        gx = torch.mm(cols.t(), weight.permute(2, 0, 1).reshape(c_out * K, c_in))
        if need_w:
            gw = torch.mm(cols, x).view(c_out, K, c_in).permute(1, 2, 0).contiguous()
        return gx, gw
    if need_x:  # stride 2: ``bwd`` selects, the input gradient gathers nothing
        gx = table_matmul(bwd, grad, weight.transpose(1, 2))
    if need_w:  # (also the stem, whose 3 input channels are cheaper to gather than the gradient)
        cols = _table_cols(x, fwd.index, fwd.n_out)  # (c_in * K, n_out)
        gw = torch.mm(cols, grad).view(c_in, K, c_out).transpose(0, 1).contiguous()
    return gx, gw


class _SparseConvFunction(torch.autograd.Function):
    """The sparse convolution; each direction ends by setting the caller's thread count for the
    set the ops that follow work on (the output in the forward, the input in the backward)."""

    @staticmethod
    def forward(ctx, x, weight, fwd: Plan, bwd: Optional[Plan], wgrad_side: str):
        ctx.save_for_backward(x, weight)
        ctx.plans = (fwd, bwd, wgrad_side)
        out = _SparseConvFunction._products(x, weight, fwd)
        caller_threads_for(out.shape[0], x.device)
        return out

    @staticmethod
    def _products(x, weight, fwd: Plan) -> torch.Tensor:
        if isinstance(fwd, TablePlan):
            return table_matmul(fwd, x, weight)
        if isinstance(fwd, OffsetPlan):
            return offset_matmul(fwd, x, weight)
        if isinstance(fwd, LinePlan):
            return line_matmul(fwd, x, weight)
        return plan_matmul(fwd, x, weight)

    @staticmethod
    def backward(ctx, grad):
        grads = _SparseConvFunction._gradients(ctx, grad)
        x = ctx.saved_tensors[0]
        caller_threads_for(x.shape[0], x.device)
        return grads

    @staticmethod
    def _gradients(ctx, grad):
        x, weight = ctx.saved_tensors
        fwd, bwd, wgrad_side = ctx.plans
        grad = _as(grad, weight.dtype).contiguous()
        gx = gw = None
        if isinstance(fwd, TablePlan):
            return table_backward(fwd, bwd, x, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + (
                None, None, None)
        if isinstance(fwd, OffsetPlan):
            return offset_backward(fwd, x, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + (
                None, None, None)
        if isinstance(fwd, LinePlan):
            return line_backward(fwd, x, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + (
                None, None, None)
        if bwd is None:
            if ctx.needs_input_grad[1] and not ctx.needs_input_grad[0] and x.shape[1] < grad.shape[1]:
                # the weight gradient alone (the stem, 3 input channels): gathering the narrow
                # input beats gathering the wide output gradient (3x faster at 3 -> 32)
                return None, plan_wgrad_out(fwd, x, grad), None, None, None
            return symmetric_backward(fwd, x, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + (
                None, None, None)
        if ctx.needs_input_grad[0]:
            gx = plan_matmul(bwd, grad, weight.transpose(1, 2).contiguous())
        if ctx.needs_input_grad[1]:
            gw = plan_wgrad_out(fwd, x, grad) if wgrad_side == "out" else plan_wgrad_in(bwd, x, grad)
        return gx, gw, None, None, None


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, fwd: Plan, bwd: Optional[Plan] = None,
                wgrad_side: str = "out") -> torch.Tensor:
    """Sparse convolution through ``fwd`` (output rows); ``bwd`` is the transposed plan, or
    None for a symmetric stride-1 kernel. Under autocast the features and weight are cast
    once, before the gathers (half the bytes moved in bf16), and the function runs with
    autocast off; without it, it runs as called (entering an autocast context costs the host
    as much as a small op, once per convolution)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return _SparseConvFunction.apply(x.contiguous(), _as(weight, x.dtype).contiguous(), fwd, bwd, wgrad_side)
    dt = torch.get_autocast_dtype(dev)
    x = _as(x, dt).contiguous()
    w = _as(weight, dt).contiguous()
    with torch.autocast(dev, enabled=False):
        return _SparseConvFunction.apply(x, w, fwd, bwd, wgrad_side)


def global_pool(feats: torch.Tensor, batch_index: torch.Tensor, mode: str = "max",
                batch_size: Optional[int] = None) -> torch.Tensor:
    """Max or average of ``feats`` (N, C) over the sites of each batch item -> (B, C).

    ``batch_index`` (N,) is the batch column of the coordinates (any backend's output rows are
    in input order, so ``coords[:, 0]`` works). Every item up to ``batch_size`` must have sites.
    """
    if mode not in ("max", "avg"):
        raise ValueError(f"global_pool: mode must be 'max' or 'avg', got {mode!r}")
    if feats.ndim != 2:
        raise ValueError(f"global_pool: feats must be (N, C), got {tuple(feats.shape)}")
    if batch_index.ndim != 1 or batch_index.shape[0] != feats.shape[0]:
        raise ValueError(f"global_pool: batch_index must be ({feats.shape[0]},), got {tuple(batch_index.shape)}")
    if feats.shape[0] == 0:
        raise ValueError("global_pool: empty batch")
    if batch_index.is_floating_point():
        raise ValueError(f"global_pool: batch_index must be integer, got {batch_index.dtype}")
    bi = batch_index.to(device=feats.device, dtype=torch.int64)
    n_items = int(bi.max()) + 1
    if int(bi.min()) < 0:
        raise ValueError("global_pool: negative batch index")
    b = n_items if batch_size is None else int(batch_size)
    if b < n_items:
        raise ValueError(f"global_pool: batch_size={b} but batch index {n_items - 1} occurs")
    counts = torch.bincount(bi, minlength=b)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).reshape(-1).tolist()
        raise ValueError(f"global_pool: batch items {empty} have no sites")
    c = feats.shape[1]
    idx = bi[:, None].expand(-1, c)
    if mode == "max":
        out = feats.new_empty((b, c)).scatter_reduce(0, idx, feats, reduce="amax", include_self=False)
    else:
        out = feats.new_zeros((b, c)).index_add(0, bi, feats) / counts[:, None].to(feats.dtype)
    return out
