"""torch.distributed in one place: process group, model wrapping, synchronised BatchNorm,
reductions and gathers.

With one process every function is a cheap no-op (or the plain single-process computation), so
the training loop, the losses and the evaluations call them unconditionally. Several processes
(started by SLURM or submitit's local executor, ``tasks_per_node`` x ``nodes``, or by a test)
join the process group with ``init_from_env``.

How several processes reproduce one big device (what the helpers below are for):

- each rank takes its contiguous share of every global batch (``harness.train.BatchStream``);
- BatchNorm statistics are those of the global batch (``convert_sync_batchnorm``; torch's own
  ``nn.SyncBatchNorm`` refuses CPU tensors, this one works with gloo and NCCL);
- a loss that averages over a variable number of rows (points, matches) divides by the global
  count (``global_mean``), so DDP's average of the ranks' gradients is the gradient of the
  global mean; a loss averaging over items needs equal items per rank (the trainer checks that
  the global batch divides evenly);
- a contrastive loss gathers the candidates of every rank (``gather_with_grad``); the backward
  pass sums, for each rank's local rows, the gradients that every rank's loss sends them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")


# > 0 inside ``solo()``: this rank works alone and every helper behaves as with one process.
_SOLO = [0]


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized() and not _SOLO[0]


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """A section that one rank runs alone (e.g. rank 0 making Scratch's seeded checkpoint while
    the others wait at a barrier): inside it no helper here starts a collective operation."""
    _SOLO[0] += 1
    try:
        yield
    finally:
        _SOLO[0] -= 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size()))) if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


# ----------------------------------------------------------------------------------------------
# Process group


def submitit_tasks() -> int:
    """Number of processes of the submitit job this process belongs to (1 outside one)."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SLURM_JOB_ID" not in os.environ:
        return 1
    try:
        import submitit

        return int(submitit.JobEnvironment().num_tasks)
    except (ImportError, RuntimeError, KeyError, ValueError):
        return int(os.environ.get("SLURM_NTASKS", "1") or 1)


def init_from_env(timeout_s: float = 600.0) -> bool:
    """Join the process group of this job; returns whether more than one process takes part.

    The layout comes from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT when set (a test, torchrun),
    else from submitit's job environment (SLURM tasks, or the tasks of submitit's local
    executor): ``TorchDistributedEnvironment().export()`` sets those variables (master = the
    job's first node; port derived from the job id). Backend: gloo on CPU; on GPUs NCCL for
    CUDA tensors and gloo for CPU tensors (scalars, objects, barriers). Collectives time out
    after ``timeout_s``, so a dead or stuck rank fails the job instead of hanging it.
    """
    if tdist.is_initialized():
        return tdist.get_world_size() > 1
    tasks = submitit_tasks() if "WORLD_SIZE" not in os.environ else 1
    if tasks > 1:
        import submitit

        # overwrite: a MASTER_ADDR left in the environment must not point the ranks elsewhere
        # (MASTER_PORT, when set, is kept: submitit reads it)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    log.info("dist.init backend=%s rank=%d world=%d local_rank=%s master=%s:%s timeout_s=%g", backend, rank(), world,
             os.environ.get("LOCAL_RANK"), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), timeout_s)
    return True


def shutdown() -> None:
    """Leave the process group (end of a job; lets another job of this process start one)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def finish(timeout_s: float = 60.0) -> None:
    """End of work that succeeded on every rank: wait for the others, let gloo's threads
    finish with their last works, then leave the group, rank 0 last.

    Rank 0 hosts the group's store, so the other ranks leave first and say so through the
    store, which rank 0 keeps alive until all of them have; rank 0 gives up waiting after
    ``timeout_s`` and leaves anyway."""
    if not tdist.is_initialized():
        return
    world = tdist.get_world_size()
    if world <= 1:
        tdist.destroy_process_group()
        return
    tdist.barrier()
    # Gloo's worker threads may still hold their last works (this barrier and, through it, the
    # collectives it waited for). Dropping one can free a tensor whose Python object then needs
    # the GIL, and a thread that asks for the GIL while the interpreter finalizes is torn down
    # with std::terminate: SIGABRT after the work was done, seen about once in 50 two-rank test
    # runs, the core showing ProcessGroupGloo::runLoop in ~AsyncBarrierWork -> decref_pyobject
    # while the main thread ran Py_FinalizeEx. destroy_process_group does not join those threads
    # once DDP has used the group (the group stays alive), so give them the GIL now.
    time.sleep(_GLOO_RELEASE_S)
    store = tdist.distributed_c10d._get_default_store()  # held: outlives the group
    if tdist.get_rank() != 0:
        tdist.destroy_process_group()
        store.add(_LEFT_KEY, 1)
        return
    deadline = time.monotonic() + timeout_s
    while store.add(_LEFT_KEY, 0) < world - 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    tdist.destroy_process_group()


_LEFT_KEY = "harness/ranks_left"
_GLOO_RELEASE_S = 0.2  # seconds for gloo's threads to drop their last works (see finish)


# ----------------------------------------------------------------------------------------------
# Model wrapping


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = True,
         broadcast_buffers: bool = True) -> nn.Module:
    """DistributedDataParallel around ``model`` when several processes train (else the model).

    ``broadcast_buffers``: True copies rank 0's buffers to every rank before each forward (safe
    for any model). The trainer passes False: after ``convert_sync_batchnorm`` every buffer it
    trains with is updated identically on all ranks (global BatchNorm statistics, DepthContrast's
    queue of keys gathered from all ranks), and DDP already copies rank 0's buffers once at
    construction; skipping the per-step copy matters for large buffers (a 131072-key queue).

    ``find_unused_parameters``: True (the default) lets a forward leave parameters without a
    gradient (a head used only on some steps, a branch of the loss); DDP then walks the autograd
    graph after each forward to find them, a small cost. False is faster, but DDP then fails at
    the second step if any parameter that requires a gradient did not get one.
    """
    if world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(find_unused_parameters),
                                   broadcast_buffers=bool(broadcast_buffers))


# ----------------------------------------------------------------------------------------------
# Synchronised BatchNorm


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (M, C): one row per normalised element."""
    if x.dim() == 2:
        return x
    return x.transpose(1, -1).reshape(-1, x.shape[1])


def _unflat(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 2:
        return y
    shape = list(like.shape)
    shape[1], shape[-1] = shape[-1], shape[1]
    return y.reshape(shape).transpose(1, -1)


class _SyncBatchNormFn(torch.autograd.Function):
    """BatchNorm over the rows of every rank: statistics and the two backward sums all-reduced.

    Forward: each rank's (count, mean, sum of squared deviations) per channel are gathered and
    combined (Chan et al.'s parallel variance, stable in float32); backward: the per-channel
    sums of dy and dy * x_hat are all-reduced, the affine parameters get their local sums
    (DDP averages them with the other gradients).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                momentum: float, group: Any) -> torch.Tensor:
        xf = x.float()
        n, c = xf.shape
        if n > 0:
            mean = xf.mean(0)
            m2 = (xf - mean).square().sum(0)
        else:
            mean, m2 = xf.new_zeros(c), xf.new_zeros(c)
        local = torch.cat([xf.new_tensor([float(n)]), mean, m2])
        parts = [torch.empty_like(local) for _ in range(tdist.get_world_size(group))]
        tdist.all_gather(parts, local, group=group)
        stats = torch.stack(parts)
        counts = stats[:, :1]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all ranks when training, "
                             f"got {int(total)} (input of shape {tuple(x.shape)} on this rank)")
        g_mean = (counts * stats[:, 1:1 + c]).sum(0) / total
        g_m2 = (stats[:, 1 + c:] + counts * (stats[:, 1:1 + c] - g_mean).square()).sum(0)
        var = g_m2 / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((g_m2 / (total - 1)).to(running_var.dtype), alpha=momentum)
        xhat = (xf - g_mean) * invstd
        w = weight.float() if weight is not None else None
        y = xhat * w if w is not None else xhat
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x, weight, g_mean, invstd)
        ctx.total, ctx.group, ctx.has_bias = total, group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, weight, g_mean, invstd = ctx.saved_tensors
        dyf = dy.float()
        xhat = (x.float() - g_mean) * invstd
        sum_dy = dyf.sum(0)
        sum_dy_xhat = (dyf * xhat).sum(0)
        both = torch.cat([sum_dy, sum_dy_xhat])
        tdist.all_reduce(both, group=ctx.group)
        c = sum_dy.numel()
        g_dy, g_dy_xhat = both[:c] / ctx.total, both[c:] / ctx.total
        scale = invstd * weight.float() if weight is not None else invstd
        dx = None
        if ctx.needs_input_grad[0]:
            dx = ((dyf - g_dy - xhat * g_dy_xhat) * scale).to(x.dtype)
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy.to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


class _SyncBatchNormMixin:
    """Training-mode forward with global statistics when several processes train; otherwise
    (one process, eval mode, running statistics) exactly the parent class's forward."""

    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (self.training and world_size() > 1):  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        momentum = self.momentum  # type: ignore[attr-defined]
        if self.track_running_stats:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            if momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
            rm, rv = self.running_mean, self.running_var  # type: ignore[attr-defined]
        else:
            rm = rv = None
        y = _SyncBatchNormFn.apply(_flat(x), self.weight, self.bias, rm, rv, self.eps,  # type: ignore[attr-defined]
                                   float(momentum or 0.0), self.group)
        return _unflat(y, x)


class SyncBatchNorm1d(_SyncBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with statistics over every rank (gloo or NCCL); same parameter and
    buffer names, so checkpoints are interchangeable with the plain layer's."""


class SyncBatchNorm2d(_SyncBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with statistics over every rank (e.g. image-guided's 2D network)."""


class SyncBatchNorm3d(_SyncBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with statistics over every rank."""


_SYNC = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}


def _as_sync(bn: nn.Module, group: Any) -> nn.Module:
    cls = _SYNC[type(bn)]
    new = cls.__new__(cls)
    new.__dict__.update(bn.__dict__)  # the same parameter and buffer objects, hooks and flags
    new.group = group
    return new


def convert_sync_batchnorm(model: nn.Module, group: Any = None) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` inside ``model`` (in place) for its synchronised
    subclass, keeping the same parameter and buffer objects (an optimiser built before still
    updates them; the state_dict keys do not change). The sparse BatchNorms of both backbone
    backends (``SparseBatchNorm.bn``, ``MinkowskiBatchNorm.bn``) hold an ``nn.BatchNorm1d``.
    Returns ``model`` (or its replacement, when ``model`` itself is a BatchNorm)."""
    if type(model) in _SYNC:
        return _as_sync(model, group)
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in _SYNC:
                parent._modules[name] = _as_sync(child, group)
    return model


# ----------------------------------------------------------------------------------------------
# Reductions


def mean_scalars(values: Dict[str, float]) -> Dict[str, float]:
    """Average logged scalars over ranks (identity with one process); a key that only some
    ranks report is averaged over those."""
    if world_size() <= 1:
        return dict(values)
    every = gather_objects(dict(values))
    keys = sorted({k for d in every for k in d})
    out = {}
    for k in keys:
        vals = [float(d[k]) for d in every if k in d]
        out[k] = sum(vals) / len(vals)
    return out


def gather_objects(obj: T) -> List[T]:
    """``obj`` of every rank, in rank order (a list of one with one process)."""
    if world_size() <= 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def any_rank(flags: List[int]) -> List[int]:
    """Element-wise maximum of small integer flags over ranks (agreement on e.g. a signal)."""
    if world_size() <= 1:
        return list(flags)
    t = torch.tensor(flags, dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def sum_array(a: np.ndarray) -> np.ndarray:
    """Element-wise sum of a numpy array over ranks (e.g. a confusion matrix of a sharded evaluation)."""
    if world_size() <= 1:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a)).clone()
    if t.dtype not in (torch.float64, torch.int64):
        t = t.to(torch.float64 if t.is_floating_point() else torch.int64)
    tdist.all_reduce(t)
    return t.numpy().astype(a.dtype, copy=False)


def shard(n: int) -> range:
    """The indices of ``range(n)`` this rank handles in a sharded evaluation (round robin)."""
    return range(rank(), n, world_size())


def global_mean(local_mean: torch.Tensor, local_count: int) -> torch.Tensor:
    """A loss averaged over this rank's ``local_count`` rows, turned into the rank's part of the
    mean over the rows of *all* ranks: ``local_mean * local_count * world / global_count``.

    DDP averages the ranks' gradients, so the result is the gradient of the mean over the global
    batch, whatever the number of rows (points, matches) on each rank; the average over ranks of
    the logged values is the global mean. One process: ``local_mean`` unchanged. A rank without
    rows passes a zero-valued loss that keeps the graph (it is scaled by 0).
    """
    if world_size() <= 1:
        return local_mean
    t = torch.tensor([float(local_count)], dtype=torch.float64)
    tdist.all_reduce(t)
    total = float(t.item())
    if local_count == 0 or total == 0:
        return local_mean * 0.0
    return local_mean * (float(local_count) * world_size() / total)


# ----------------------------------------------------------------------------------------------
# Gathers


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world = tdist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        tdist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        counts = [int(s.item()) for s in sizes]
        n_max = max(counts)
        padded = x.new_zeros((n_max,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        tdist.all_gather(parts, padded)
        me = tdist.get_rank()
        ctx.offset, ctx.n = sum(counts[:me]), x.shape[0]
        return torch.cat([p[:c] for p, c in zip(parts, counts)], 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad[ctx.offset:ctx.offset + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order).

    Gradients flow to the local part only, and it receives the sum of the gradients that every
    rank's loss sends to these rows (an all-reduce in the backward pass), which is what makes
    DDP's averaged gradient that of a loss over the global batch. Every rank must call it (and,
    when ``x`` requires a gradient, run the backward pass). Identity with one process.
    """
    if world_size() <= 1:
        return x
    return _GatherWithGrad.apply(x)


def rank_offset(n_local: int, device: Optional[torch.device] = None) -> int:
    """Number of rows that ranks before this one contribute to a ``gather_with_grad``."""
    if world_size() <= 1:
        return 0
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    tdist.all_gather(sizes, torch.tensor([n_local], device=device))
    return int(sum(int(s.item()) for s in sizes[: rank()]))


# ----------------------------------------------------------------------------------------------
# Writes by one rank


def main_writes(write: Callable[[], T]) -> Optional[T]:
    """Run ``write`` on rank 0 only, then wait until it is done (every rank must call this).

    If rank 0 fails, it raises here and the others fail at their next collective (or at this
    barrier) with a connection error, within the collective timeout at worst."""
    out = write() if is_main() else None
    barrier()
    return out
