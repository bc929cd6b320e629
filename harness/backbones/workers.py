"""A small pool of threads that run torch CPU ops single-threaded, side by side.

Why: a sparse convolution is hundreds of medium-sized ops (gather, GEMM, write) per bucket
and chunk. Run one after another with torch's intra-op threads, every op ends in an OpenMP
barrier; when other jobs share the cores, each barrier waits for a descheduled partner thread
and a step becomes many times slower (measured on the shared 2-core machine: 2 threads 17-35 s,
1 thread 2.1 s for the same 3k-voxel step). Here each worker thread runs whole tasks
single-threaded and takes the next task when done, so the only synchronisation is the end of
the convolution, and the work balances itself across workers.

The threads of torch's own intra-op pool must not spin while the workers run: harness sets
OMP_WAIT_POLICY=PASSIVE before torch loads (see harness/__init__.py).

Torch's thread count is per OS thread (OpenMP ICV, MKL's local setting): the workers set
theirs to 1 once; the caller's setting is restored right after (``torch.set_num_threads``
also stores a process-wide default that new threads start from).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from typing import Any, Callable, List, Optional

import torch

__all__ = ["caller_threads_for", "on_worker_thread", "restore_caller_threads", "run_tasks", "worker_count"]

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_POOL: Optional["_Pool"] = None
_LOCAL = threading.local()  # .worker is True on pool threads


def _hint_wait_policy() -> None:
    import harness

    if harness.TORCH_LOADED_FIRST:
        logger.info("torch was imported before harness, so OpenMP threads spin after every parallel op and "
                    "take CPU from the sparse-convolution workers; import harness first or set "
                    "OMP_WAIT_POLICY=PASSIVE (about 10% faster steps on 2 cores)")


class _Pool:
    def __init__(self, n: int):
        self.n = n
        self.pid = os.getpid()
        self.jobs: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        ready = threading.Barrier(n + 1)
        caller_threads = torch.get_num_threads()
        self.threads = [threading.Thread(target=self._loop, args=(ready,), daemon=True, name=f"harness-sparse-{i}")
                        for i in range(n)]
        for t in self.threads:
            t.start()
        ready.wait()
        torch.set_num_threads(caller_threads)  # restore the process-wide default the workers changed
        _hint_wait_policy()

    def _loop(self, ready: threading.Barrier) -> None:
        _LOCAL.worker = True
        # A thread's first torch call initialises its thread count from the process-wide
        # default; do that first, so that the 1 set next is not overwritten later.
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
        while True:
            job = self.jobs.get()
            job()

    def run(self, fn: Callable[[int, int], Any], n_tasks: int) -> List[Any]:
        results: List[Any] = [None] * n_tasks
        counter = itertools.count()
        errors: List[BaseException] = []
        left = [self.n]
        lock = threading.Lock()
        done = threading.Event()

        def work(wid: int) -> None:
            try:
                with torch.no_grad():  # grad mode is per thread; tasks never record a graph
                    while not errors:
                        i = next(counter)
                        if i >= n_tasks:
                            break
                        results[i] = fn(i, wid)
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)
            finally:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        for wid in range(self.n):
            self.jobs.put(lambda wid=wid: work(wid))
        done.wait()
        if errors:
            raise errors[0]
        return results


def _after_fork_in_child() -> None:
    global _LOCK, _POOL
    _LOCK = threading.Lock()
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Coordinate sets with fewer sites than this run the caller's own torch ops single-threaded
# (see caller_threads_for). Measured on the 2-core CPU with OMP_WAIT_POLICY=PASSIVE (2 threads
# against 1, medians of 200): batch norm forward at 359 x 256 313 against 45 us, at 6105 x 64
# 519 against 170 us, ReLU at 359 x 256 55 against 9 us; at 25173 x 96 two threads win (batch
# norm forward+backward 4.2 against 8.4 ms).
SMALL_SET_SITES = 16384


def _configured_threads() -> int:
    """The caller's torch thread count, or what it was before caller_threads_for lowered it
    (unless the count has changed since: then the caller set it)."""
    saved = getattr(_LOCAL, "saved_threads", None)
    if saved is not None and torch.get_num_threads() == 1:
        return saved
    _LOCAL.saved_threads = None
    return max(1, torch.get_num_threads())


def caller_threads_for(sites: int, device: torch.device) -> None:
    """Set the calling thread's torch thread count for the ops that follow on a set of
    ``sites`` sites: 1 below SMALL_SET_SITES, else the configured count. Lowered inside a
    backward pass, the count comes back when that pass ends. Why: with the passive OpenMP
    wait policy each parallel op first wakes the partner thread, which costs more than a small
    op's work (Res16UNet34C steps alternating with and without this: 1.22x at 5k voxels,
    1.06-1.08x at 2k and 20k, 1.00x at 100k). The worker pool keeps the configured width."""
    if device.type != "cpu" or on_worker_thread():
        return
    threads = _configured_threads()
    if threads <= 1:
        return
    if sites >= SMALL_SET_SITES:
        restore_caller_threads()
        return
    _LOCAL.saved_threads = threads
    torch.set_num_threads(1)
    task = torch._C._current_graph_task_id()  # -1 outside a backward pass
    if task != -1 and getattr(_LOCAL, "restore_task", None) != task:
        _LOCAL.restore_task = task
        torch.autograd.Variable._execution_engine.queue_callback(restore_caller_threads)


def restore_caller_threads() -> None:
    """Undo caller_threads_for (at the end of a forward or backward pass)."""
    saved = getattr(_LOCAL, "saved_threads", None)
    _LOCAL.saved_threads = None
    if saved is not None and torch.get_num_threads() == 1:
        torch.set_num_threads(saved)


def on_worker_thread() -> bool:
    """Whether the calling thread is one of the pool's workers."""
    return getattr(_LOCAL, "worker", False)


def worker_count(device: torch.device) -> int:
    """Threads that run tasks for ops on ``device``: the caller's configured torch thread
    count on the CPU (1 = the caller itself), 1 elsewhere."""
    if device.type != "cpu" or on_worker_thread():
        return 1
    return _configured_threads()


def run_tasks(fn: Callable[[int, int], Any], n_tasks: int, device: torch.device) -> List[Any]:
    """``[fn(i, worker) for i in range(n_tasks)]``, on the worker pool when it helps, with
    ``worker`` in ``range(worker_count(device))`` naming the thread (for its scratch buffers).
    Tasks must write disjoint memory; results come back in task order."""
    global _POOL
    n = worker_count(device)
    if n <= 1 or n_tasks <= 1:
        return [fn(i, 0) for i in range(n_tasks)]
    with _LOCK:
        if _POOL is None or _POOL.n != n or _POOL.pid != os.getpid():
            _POOL = _Pool(n)  # (re)created after a fork or a change of torch.set_num_threads
        pool = _POOL
    return pool.run(fn, n_tasks)
