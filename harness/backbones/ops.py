"""Sparse operations of the torch backend, and helpers shared by every backend.

Convolutions run as gather -> GEMM -> write per bucket of a :class:`~.kernel_map.Plan`; the
autograd function keeps only its input, its weight and the (shared) plans, never a gathered
matrix, and re-gathers in backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernel_map import Plan
from .workers import run_tasks

__all__ = ["plan_matmul", "plan_wgrad_out", "plan_wgrad_in", "symmetric_backward", "sparse_conv", "global_pool"]


def _padded(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """``x`` with a zero row appended when the plan reads absent entries (one copy per call,
    instead of zeroing entries chunk by chunk)."""
    if not plan.padded:
        return x
    return torch.cat([x, x.new_zeros((1, x.shape[1]))], dim=0)


def plan_matmul(plan: Plan, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_i x[table[r, i]] @ weight[i]`` for a (K, C, C_out) weight.

    One task per chunk (gather -> GEMM -> write of disjoint output rows); tasks run on the
    worker threads (see :mod:`.workers`)."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    out = x.new_empty((plan.n_out, c_out)) if plan.covers_all else x.new_zeros((plan.n_out, c_out))
    xp = _padded(plan, x)
    wcache = {}

    def task(t: int) -> None:
        bi, r0, r1 = plan.chunks[t]
        b = plan.buckets[bi]
        k = b.k
        wb = wcache.get(bi)
        if wb is None:
            wb = wcache[bi] = weight.index_select(0, b.cols).view(k * c_in, c_out)
        g = xp.index_select(0, b.idx[r0 * k:r1 * k]).view(r1 - r0, k * c_in)
        if b.rows is None:
            torch.mm(g, wb, out=out[b.start + r0:b.start + r1])
        else:
            out.index_copy_(0, b.rows[r0:r1], torch.mm(g, wb))

    run_tasks(task, len(plan.chunks), x.device)
    return out


class _WeightGrad:
    """Adds per-bucket weight gradients into ``dw`` a batch at a time (one index_add per
    ~16 MB of bucket gradients instead of one per bucket), in task order (deterministic)."""

    LIMIT = 4 * 1024 * 1024  # elements

    def __init__(self, dw: torch.Tensor):
        self.dw, self.parts, self.cols, self.size = dw, [], [], 0

    def add(self, cols: torch.Tensor, part: torch.Tensor) -> None:
        self.parts.append(part)
        self.cols.append(cols)
        self.size += part.numel()
        if self.size >= self.LIMIT:
            self.flush()

    def flush(self) -> torch.Tensor:
        if self.parts:
            if len(self.parts) == 1:
                self.dw.index_add_(0, self.cols[0], self.parts[0])
            else:
                self.dw.index_add_(0, torch.cat(self.cols), torch.cat(self.parts))
            self.parts, self.cols, self.size = [], [], 0
        return self.dw


def _piece_chunks(b, r0: int, r1: int):
    for c0 in range(r0, r1, b.step):
        yield c0, min(r1, c0 + b.step)


def plan_wgrad_out(plan: Plan, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Weight gradient from the output side: ``dW[i] = sum_r x[table[r, i]]^T grad[r]``."""
    c_in, c_out = x.shape[1], grad.shape[1]
    xp = _padded(plan, x)

    def task(t: int) -> torch.Tensor:
        bi, p0, p1 = plan.pieces[t]
        b = plan.buckets[bi]
        k = b.k
        acc = None
        for r0, r1 in _piece_chunks(b, p0, p1):
            g = xp.index_select(0, b.idx[r0 * k:r1 * k]).view(r1 - r0, k * c_in)
            go = grad[b.start + r0:b.start + r1] if b.rows is None else grad.index_select(0, b.rows[r0:r1])
            acc = torch.mm(g.t(), go) if acc is None else acc.addmm_(g.t(), go)
        return acc.view(k, c_in, c_out)

    parts = run_tasks(task, len(plan.pieces), x.device)
    acc_all = _WeightGrad(grad.new_zeros((plan.K, c_in, c_out)))
    for (bi, _, _), part in zip(plan.pieces, parts):
        acc_all.add(plan.buckets[bi].cols, part)
    return acc_all.flush()


def plan_wgrad_in(plan: Plan, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Weight gradient from the input side, ``plan`` being over the rows of ``x``:
    ``dW[i] = sum_r x[r]^T grad[table[r, i]]``."""
    c_in, c_out = x.shape[1], grad.shape[1]
    gp = _padded(plan, grad)

    def task(t: int) -> torch.Tensor:
        bi, p0, p1 = plan.pieces[t]
        b = plan.buckets[bi]
        k = b.k
        acc = None
        for r0, r1 in _piece_chunks(b, p0, p1):
            g = gp.index_select(0, b.idx[r0 * k:r1 * k]).view(r1 - r0, k * c_out)
            xi = x[b.start + r0:b.start + r1] if b.rows is None else x.index_select(0, b.rows[r0:r1])
            acc = torch.mm(xi.t(), g) if acc is None else acc.addmm_(xi.t(), g)
        return acc.view(c_in, k, c_out).transpose(0, 1)

    parts = run_tasks(task, len(plan.pieces), x.device)
    acc_all = _WeightGrad(grad.new_zeros((plan.K, c_in, c_out)))
    for (bi, _, _), part in zip(plan.pieces, parts):
        acc_all.add(plan.buckets[bi].cols, part)
    return acc_all.flush()


def symmetric_backward(plan: Plan, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_x: bool,
                       need_w: bool):
    """Both gradients of a stride-1 conv with a symmetric (odd) kernel from one gather.

    The transposed map of offset i is offset K-1-i of the same table, so per chunk the
    gathered output gradient ``G[q] = [grad[table[q, j]]]_j`` serves the input gradient
    (``G @ W[K-1-j]^T``) and the weight gradient (``x[q]^T G`` is ``dW[K-1-j]``); x is never
    gathered again. Tasks are the plan's pieces (whole chunks of one bucket).
    """
    K, c_in, c_out = weight.shape
    gp = _padded(plan, grad)
    gx = grad.new_empty((plan.n_out, c_in)) if need_x else None
    wt = weight.flip(0).transpose(1, 2).contiguous() if need_x else None  # wt[j] = W[K-1-j]^T
    wcache = {}

    def task(t: int):
        bi, p0, p1 = plan.pieces[t]
        b = plan.buckets[bi]
        k = b.k
        wb = None
        if need_x:
            wb = wcache.get(bi)
            if wb is None:
                wb = wcache[bi] = wt.index_select(0, b.cols).view(k * c_out, c_in)
        acc = None
        for r0, r1 in _piece_chunks(b, p0, p1):
            g = gp.index_select(0, b.idx[r0 * k:r1 * k]).view(r1 - r0, k * c_out)
            if need_x:
                if b.rows is None:
                    torch.mm(g, wb, out=gx[b.start + r0:b.start + r1])
                else:
                    gx.index_copy_(0, b.rows[r0:r1], torch.mm(g, wb))
            if need_w:
                xi = x[b.start + r0:b.start + r1] if b.rows is None else x.index_select(0, b.rows[r0:r1])
                acc = torch.mm(xi.t(), g) if acc is None else acc.addmm_(xi.t(), g)
        return None if acc is None else acc.view(c_in, k, c_out).transpose(0, 1)

    parts = run_tasks(task, len(plan.pieces), grad.device)
    gw = None
    if need_w:
        acc_all = _WeightGrad(grad.new_zeros((K, c_in, c_out)))
        for (bi, _, _), part in zip(plan.pieces, parts):
            acc_all.add(K - 1 - plan.buckets[bi].cols, part)
        gw = acc_all.flush()
    return gx, gw


class _SparseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, fwd: Plan, bwd: Optional[Plan], wgrad_side: str):
        ctx.save_for_backward(x, weight)
        ctx.plans = (fwd, bwd, wgrad_side)
        return plan_matmul(fwd, x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        fwd, bwd, wgrad_side = ctx.plans
        grad = grad.to(weight.dtype).contiguous()
        gx = gw = None
        if bwd is None:
            return symmetric_backward(fwd, x, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + (
                None, None, None)
        if ctx.needs_input_grad[0]:
            gx = plan_matmul(bwd, grad, weight.transpose(1, 2).contiguous())
        if ctx.needs_input_grad[1]:
            gw = plan_wgrad_out(fwd, x, grad) if wgrad_side == "out" else plan_wgrad_in(bwd, x, grad)
        return gx, gw, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, fwd: Plan, bwd: Optional[Plan] = None,
                wgrad_side: str = "out") -> torch.Tensor:
    """Sparse convolution through ``fwd`` (output rows); ``bwd`` is the transposed plan, or
    None for a symmetric stride-1 kernel. Under autocast the features and weight are cast
    once, before the gathers (half the bytes moved in bf16)."""
    dt = _compute_dtype(x)
    x = x.to(dt).contiguous()
    w = weight.to(dt).contiguous()
    with torch.autocast(x.device.type, enabled=False):
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
