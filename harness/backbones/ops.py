"""Sparse operations of the torch backend, and helpers shared by every backend.

Convolutions run as gather -> GEMM -> write per bucket of a :class:`~.kernel_map.Plan`; the
autograd function keeps only its input, its weight and the (shared) plans, never a gathered
matrix, and re-gathers in backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernel_map import Plan

__all__ = ["plan_matmul", "plan_wgrad_out", "plan_wgrad_in", "sparse_conv", "global_pool"]


def _padded(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """``x`` with a zero row appended when the plan reads absent entries (one copy per call,
    instead of zeroing entries chunk by chunk)."""
    if not plan.padded:
        return x
    return torch.cat([x, x.new_zeros((1, x.shape[1]))], dim=0)


def _chunks(b):
    for r0 in range(0, b.n, b.step):
        yield r0, min(b.n, r0 + b.step)


def plan_matmul(plan: Plan, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_i x[table[r, i]] @ weight[i]`` for a (K, C, C_out) weight."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    out = x.new_empty((plan.n_out, c_out)) if plan.covers_all else x.new_zeros((plan.n_out, c_out))
    xp = _padded(plan, x)
    for b in plan.buckets:
        k = b.k
        wb = weight.index_select(0, b.cols).view(k * c_in, c_out)
        for r0, r1 in _chunks(b):
            g = xp.index_select(0, b.idx[r0 * k:r1 * k]).view(r1 - r0, k * c_in)
            if b.rows is None:
                torch.mm(g, wb, out=out[b.start + r0:b.start + r1])
            else:
                out.index_copy_(0, b.rows[r0:r1], torch.mm(g, wb))
    return out


class _WeightGrad:
    """Accumulates per-bucket weight gradients and adds them into ``dw`` a batch at a time
    (one index_add per ~16 MB of bucket gradients instead of one per bucket)."""

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


def plan_wgrad_out(plan: Plan, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Weight gradient from the output side: ``dW[i] = sum_r x[table[r, i]]^T grad[r]``."""
    c_in, c_out = x.shape[1], grad.shape[1]
    acc_all = _WeightGrad(grad.new_zeros((plan.K, c_in, c_out)))
    xp = _padded(plan, x)
    for b in plan.buckets:
        k = b.k
        acc = None
        for r0, r1 in _chunks(b):
            g = xp.index_select(0, b.idx[r0 * k:r1 * k]).view(r1 - r0, k * c_in)
            if b.rows is None:
                go = grad[b.start + r0:b.start + r1]
            else:
                go = grad.index_select(0, b.rows[r0:r1])
            acc = torch.mm(g.t(), go) if acc is None else acc.addmm_(g.t(), go)
        acc_all.add(b.cols, acc.view(k, c_in, c_out))
    return acc_all.flush()


def plan_wgrad_in(plan: Plan, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Weight gradient from the input side, ``plan`` being over the rows of ``x``:
    ``dW[i] = sum_r x[r]^T grad[table[r, i]]``."""
    c_in, c_out = x.shape[1], grad.shape[1]
    acc_all = _WeightGrad(grad.new_zeros((plan.K, c_in, c_out)))
    gp = _padded(plan, grad)
    for b in plan.buckets:
        k = b.k
        acc = None
        for r0, r1 in _chunks(b):
            g = gp.index_select(0, b.idx[r0 * k:r1 * k]).view(r1 - r0, k * c_out)
            if b.rows is None:
                xi = x[b.start + r0:b.start + r1]
            else:
                xi = x.index_select(0, b.rows[r0:r1])
            acc = torch.mm(xi.t(), g) if acc is None else acc.addmm_(xi.t(), g)
        acc_all.add(b.cols, acc.view(c_in, k, c_out).transpose(0, 1))
    return acc_all.flush()


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
        if ctx.needs_input_grad[0]:
            if bwd is None:
                # Symmetric (stride-1, odd) kernel: the transposed map is the same table with
                # offset i read as offset K-1-i.
                gx = plan_matmul(fwd, grad, weight.flip(0).transpose(1, 2).contiguous())
            else:
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
