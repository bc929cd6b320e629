"""torch.distributed in one place: rank queries, model wrapping, reductions and gathers.

With one process every function is a cheap no-op, so the training loop and the losses call
them unconditionally. Several processes (started by SLURM through submitit, or by a test)
initialise the process group with ``init_from_env``.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def init_from_env(timeout_s: float = 600.0) -> bool:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (or SLURM via
    submitit); returns whether more than one process takes part. NCCL on CUDA, gloo on CPU.
    Collectives time out after ``timeout_s`` so a dead rank fails the job instead of hanging it."""
    if is_initialized():
        return world_size() > 1
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        try:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except (ImportError, RuntimeError) as exc:  # not inside a submitit job
            log.debug("dist.env skipped=%s", exc)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("dist.init backend=%s rank=%d world=%d", backend, rank(), world)
    return True


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when several processes train (else the model)."""
    if world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def mean_scalars(values: Dict[str, float]) -> Dict[str, float]:
    """Average logged scalars over ranks (identity with one process)."""
    if world_size() <= 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    tdist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow to the local part only."""
    if world_size() <= 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    tdist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    n_max = int(max(s.item() for s in sizes))
    padded = torch.zeros((n_max,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    tdist.all_gather(parts, padded)
    parts = [p[: int(s.item())] for p, s in zip(parts, sizes)]
    parts[rank()] = x
    return torch.cat(parts, 0)


def rank_offset(n_local: int, device: Optional[torch.device] = None) -> int:
    """Number of rows that ranks before this one contribute to a ``gather_with_grad``."""
    if world_size() <= 1:
        return 0
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    tdist.all_gather(sizes, torch.tensor([n_local], device=device))
    return int(sum(int(s.item()) for s in sizes[: rank()]))
