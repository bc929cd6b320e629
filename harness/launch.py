"""Job functions and launchers: the same picklable job runs in-process, locally or on SLURM.

``Job`` is a submitit ``Checkpointable``: on preemption or time-out SLURM signals it, the
training loop saves its checkpoint at the end of the current step, and submitit requeues a fresh
``Job`` that resumes from that checkpoint. A job writes its ``result.json`` (done, or failed
with its error and log path) and never decides anything from the scheduler's state.

Launchers express the pre-train -> fine-tune dependency themselves: locally by starting a
fine-tuning job only when its pre-training result is in the store; on SLURM with ``afterok``.

Signals in a SLURM job (see scripts/slurm_local.sh for how SLURM and submitit behave):
- USR2 (submitit's ``--signal=USR2@90`` before the time limit, or a preemption) and USR1
  (``scancel --signal=USR1``, or ``--signal=USR1@...`` in the sweep's extra sbatch parameters):
  the trainer saves its checkpoint at the end of the current step, then submitit's handler dumps
  ``Job.checkpoint`` and requeues the job (``scontrol requeue``) and exits;
- TERM (``scontrol requeue``, preemption with PreemptMode=REQUEUE, ``scancel``): the trainer
  saves its checkpoint and stops; SLURM requeues the job itself (or it was cancelled).
Either way nothing is recorded as a failure, and the requeued job resumes from the checkpoint.
A requeued job whose result is already in the store returns it without running again.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import submitit

from harness.sweep import FINETUNE, PRETRAIN, JobSpec, Plan
from harness.store import DONE, FAILED, Store

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    else:
        root.setLevel(level)


def _set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


def job_threads(spec: JobSpec) -> int:
    """Torch threads of this process: the spec's (the local launcher sets threads per process),
    else its CPU allocation (SLURM's CPUs per task), else this machine's CPUs shared by the job's
    processes on this node."""
    if spec.threads:
        return spec.threads
    for var in ("SLURM_CPUS_PER_TASK", "SUBMITIT_CPUS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return max(1, (os.cpu_count() or 1) // max(1, int(spec.tasks_per_node or 1)))


def now_iso() -> str:
    """Local time with milliseconds and UTC offset (start/end times of jobs are compared)."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _slurm_info() -> Dict[str, Any]:
    """The SLURM job id and restart count of this process (empty outside SLURM)."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    return {"slurm_job_id": job, "slurm_restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}


def _log_path() -> Optional[str]:
    try:
        env = submitit.JobEnvironment()
        return str(env.paths.stderr)
    except (RuntimeError, KeyError):  # not inside a submitit job (debug executor, plain call)
        return None


def _build_context(spec: JobSpec, dataset_name: str, dataset_cfg: Dict[str, Any], checkpoint: Optional[Path],
                   workdir: Path):
    from omegaconf import OmegaConf

    from harness.config import BackboneConfig, TrainerConfig, plugin_config
    from harness.context import RunContext
    from harness.registry import DATASETS
    from harness.train import resolve_device

    ds_cfg = plugin_config("dataset", dataset_name, dataset_cfg)
    dataset = DATASETS.get(dataset_name)(ds_cfg)
    prepared = _prepared(dataset)
    backbone = OmegaConf.merge(OmegaConf.structured(BackboneConfig), spec.backbone)
    trainer = OmegaConf.merge(OmegaConf.structured(TrainerConfig), spec.trainer)
    return RunContext(workdir=workdir, seed=spec.seed, device=resolve_device(spec.device), backbone=backbone,
                      trainer=trainer, dataset=prepared, checkpoint=checkpoint,
                      progress=sys.stderr.isatty())


def _prepared(dataset: Any) -> Any:
    """The dataset read through its prepared cache when the data layer offers one."""
    try:
        from harness.data.prepare import prepared
    except ImportError:
        return dataset
    return prepared(dataset)


def run_pretrain(spec: JobSpec, sync: bool = True) -> Dict[str, Any]:
    """Pre-train ``spec.method`` and export its backbone; returns (and stores) the result."""
    from harness.config import method_of, plugin_config
    from harness.registry import METHODS

    store = Store(Path(spec.run_dir))
    workdir = claim_workdir(store.job_dir(PRETRAIN, spec.id), spec.config_hash, sync)
    start = time.time()
    name = method_of(spec.method, spec.method_cfg)
    method_cfg = plugin_config("method", name, spec.method_cfg)
    method = METHODS.get(name)(method_cfg)
    ctx = _build_context(spec, spec.dataset, spec.dataset_cfg, None, workdir)
    torch_seed(spec.seed)
    path = method.pretrain(ctx)
    from harness import distributed as dist

    result = {"status": DONE, "kind": PRETRAIN, "id": spec.id, "method": spec.method, "seed": spec.seed,
              "checkpoint": str(path), "config_hash": spec.config_hash, "wall_seconds": round(time.time() - start, 2),
              "method_version": method_cfg.version, **_provenance(), **_runtime(ctx), **ctx.extra}
    if dist.is_main():
        store.write(PRETRAIN, spec.id, result)
    return result


def run_finetune(spec: JobSpec) -> Dict[str, Any]:
    """Fine-tune from the method's checkpoint on one (dataset, task) column; store the metric."""
    from harness.config import plugin_config
    from harness.registry import TASKS

    store = Store(Path(spec.run_dir))
    if spec.inline_pretrain:
        from harness import distributed as dist

        if dist.is_main():
            with dist.solo():  # the others wait at the barrier below
                _ensure_inline_pretrain(spec, store)
        dist.barrier()
    pre = store.read(PRETRAIN, spec.pretrain_id)
    if not pre or pre.get("status") != DONE or pre.get("config_hash") != spec.pretrain_hash:
        raise RuntimeError(f"pre-training {spec.pretrain_id} has no current result in {store.root}/pretrain; "
                           f"it must finish before {spec.id}")
    workdir = claim_workdir(store.job_dir(FINETUNE, spec.id), spec.config_hash)
    start = time.time()
    task_cfg = plugin_config("task", spec.task, spec.task_cfg)
    task = TASKS.get(spec.task)(task_cfg)
    ctx = _build_context(spec, spec.dataset, spec.dataset_cfg, Path(pre["checkpoint"]), workdir)
    torch_seed(spec.seed)
    metrics = task.run(ctx)
    from harness import distributed as dist

    metric = type(task).metric
    result = {"status": DONE, "kind": FINETUNE, "id": spec.id, "method": spec.method, "column": spec.column,
              "dataset": spec.dataset, "task": spec.task, "seed": spec.seed, "metric": metric,
              "value": float(metrics[metric]), "metrics": metrics, "config_hash": spec.config_hash,
              "pretrain_hash": spec.pretrain_hash, "checkpoint": pre["checkpoint"],
              "wall_seconds": round(time.time() - start, 2), "task_version": task_cfg.version,
              "method_version": pre.get("method_version"), **_provenance(), **_runtime(ctx), **ctx.extra}
    if dist.is_main():
        store.write(FINETUNE, spec.id, result)
    return result


CONFIG_MARKER = "config_hash"


def claim_workdir(workdir: Path, config_hash: str, sync: bool = True) -> Path:
    """The job's working directory, cleared of a previous attempt's training state when that
    attempt had another configuration.

    The trainer resumes from ``ckpt/<name>-last.pt`` whatever wrote it; a re-launch after a
    config change (same job id, new hash) must start from step 0, not from the old run's
    weights. Same hash: the checkpoint is kept and resumed (requeue, retry after a crash).
    ``sync``: all ranks call this and wait for the main rank (False: only the main rank calls).
    """
    import shutil

    from harness import distributed as dist

    workdir.mkdir(parents=True, exist_ok=True)
    if not dist.is_main():
        if sync:
            dist.barrier()  # the main rank clears and marks the directory
        return workdir
    marker = workdir / CONFIG_MARKER
    previous = marker.read_text().strip() if marker.is_file() else None
    if previous != config_hash:
        stale = [p for p in [workdir / "ckpt", *workdir.glob("metrics-*.jsonl")] if p.exists()]
        if stale:
            log.warning("job.stale_state workdir=%s old_hash=%s new_hash=%s removed=%s", workdir, previous,
                        config_hash, ",".join(p.name for p in stale))
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        from harness.data.cache import atomic_write_text

        atomic_write_text(marker, config_hash + "\n")
    if sync:
        dist.barrier()
    return workdir


def _ensure_inline_pretrain(spec: JobSpec, store: Store) -> None:
    """Run a data-free method's 'pre-training' (Scratch: seeded init) once, under a lock."""
    from harness.data.cache import file_lock

    pre_dir = store.job_dir(PRETRAIN, spec.pretrain_id)
    with file_lock(pre_dir.parent / f".{spec.pretrain_id}.lock"):
        if store.is_done(PRETRAIN, spec.pretrain_id, spec.pretrain_hash or ""):
            return
        pspec = JobSpec(PRETRAIN, spec.pretrain_id, spec.method, spec.seed, spec.run_dir, spec.method_cfg,
                        spec.backbone, spec.trainer, spec.device, spec.dataset, spec.dataset_cfg,
                        config_hash=spec.pretrain_hash or "", threads=spec.threads)
        run_pretrain(pspec, sync=False)


def torch_seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _provenance() -> Dict[str, Any]:
    from harness.provenance import git_commit

    return {"git_commit": git_commit(), "host": socket.gethostname(), "started": _STARTED.get("at"),
            "finished": now_iso(), "log": _log_path(), **_slurm_info()}


def _runtime(ctx: Any) -> Dict[str, Any]:
    """What computed the number: the device (with the GPU's name), the torch version and the
    backbone backend that ``auto`` resolved to; the same cell on a CPU and on a GPU rounds its
    sums differently, so the table's numbers are only comparable where these agree."""
    import torch

    from harness.backbones import resolve_backend

    device = str(ctx.device)
    if ctx.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(ctx.device)})"
    return {"device": device, "torch": torch.__version__, "backend": resolve_backend(ctx.backbone.backend)}


# When the current job (this attempt) started: set by Job.__call__, read into the result.
_STARTED: Dict[str, str] = {}


RUNNERS: Dict[str, Callable[[JobSpec], Dict[str, Any]]] = {PRETRAIN: run_pretrain, FINETUNE: run_finetune}


def _enable_faulthandler() -> None:
    """A crash in native code (segfault, abort in gloo or MinkowskiEngine) then leaves every
    thread's Python stack in the job's stderr log, not just a signal number. Skipped where
    stderr is no file (a job run inside another program that captured it)."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, OSError, ValueError, RuntimeError) as exc:
        log.debug("faulthandler not enabled: %s", exc)


def _done_result(spec: JobSpec) -> Optional[Dict[str, Any]]:
    """The job's stored result when it is done with this configuration, else None."""
    r = Store(Path(spec.run_dir)).read(spec.kind, spec.id)
    return r if r and r.get("status") == DONE and r.get("config_hash") == spec.config_hash else None


class JobLocked(RuntimeError):
    """Another process is running the same job (same run directory and job id)."""


class job_lock:
    """Held by a job's main process for its lifetime: a second process of the same job (a rerun
    while an orphaned earlier one still trains, e.g. after ``kill -9`` of the launcher alone)
    waits up to ``wait_s`` (a requeued SLURM job whose previous instance is still exiting), then
    stops with :class:`JobLocked` naming the holder, instead of writing the same checkpoint, log
    and result concurrently. An OS lock (``flock``): released by any death of the holder. A
    file system without locks: no lock, a debug log line."""

    def __init__(self, workdir: Path, job_id: str, wait_s: float = 60.0):
        self.path, self.job_id, self.wait_s = Path(workdir) / ".lock", job_id, wait_s
        self.fh: Any = None

    def __enter__(self) -> "job_lock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.fh.seek(0)
                    holder = self.fh.read().strip() or "another process"
                    self.fh.close()
                    raise JobLocked(f"job {self.job_id} is running in {holder} ({self.path}); wait for it to end "
                                    "or stop it, then run the sweep again") from None
                time.sleep(1.0)
            except OSError as exc:  # e.g. ENOLCK / EOPNOTSUPP on a file system without locks
                log.debug("job.lock_unavailable file=%s error=%s", self.path, exc)
                return self
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()  # closing releases the lock


class Job(submitit.helpers.Checkpointable):
    """The job function of every launcher: runs one ``JobSpec`` and records success or failure."""

    def __call__(self, spec: JobSpec) -> Dict[str, Any]:
        _STARTED["at"] = now_iso()
        setup_logging()
        _enable_faulthandler()
        done = _done_result(spec)
        if done:  # e.g. SLURM requeued a job that had already finished (scontrol requeue within KillWait)
            log.info("job.already_done id=%s", spec.id)
            return done
        _set_threads(job_threads(spec))
        _checkpoint_on_usr1()
        from harness import distributed as dist
        from harness.train import Preempted

        dist.init_from_env(timeout_s=float((spec.trainer or {}).get("collective_timeout_s", 600.0)))
        errors = rank_errors_dir(spec)
        if dist.world_size() > 1:
            import shutil

            dist.main_writes(lambda: shutil.rmtree(errors, ignore_errors=True))  # an earlier attempt's
        log.info("job.start id=%s kind=%s rank=%d world=%d threads=%d %s", spec.id, spec.kind, dist.rank(),
                 dist.world_size(), job_threads(spec), " ".join(f"{k}={v}" for k, v in _slurm_info().items()))
        try:
            if dist.is_main():
                with job_lock(spec.workdir, spec.id):
                    done = _done_result(spec) if dist.world_size() == 1 else None
                    if done:
                        log.info("job.already_done id=%s (by the process that held its lock)", spec.id)
                        return done
                    result = RUNNERS[spec.kind](spec)
            else:
                result = RUNNERS[spec.kind](spec)
            dist.finish()
            return result
        except (Preempted, SystemExit):
            # Checkpoint saved; submitit's handler requeued the job and exits (SystemExit), or
            # SLURM itself requeues/cancels it (TERM). Not a failure of the job.
            raise
        except BaseException as exc:
            if dist.world_size() > 1:
                write_rank_error(errors, exc)
            if dist.is_main():
                record_failure(spec, exc, rank_errors=collect_rank_errors(errors, exc) if dist.world_size() > 1 else None)
            raise

    def checkpoint(self, spec: JobSpec) -> submitit.helpers.DelayedSubmission:
        # The training loop has saved its state; a fresh Job resumes from it.
        return submitit.helpers.DelayedSubmission(Job(), spec)


def _checkpoint_on_usr1() -> None:
    """In a submitit SLURM job, USR1 checkpoints and requeues like submitit's own signal.

    submitit handles only its preemption signal (USR2 by default); USR1 is what users send with
    ``scancel --signal=USR1`` and what many sites configure with ``--signal=USR1@<s>``. The
    trainer catches it first (checkpoint at the end of the step) and then calls this handler.
    """
    try:
        env = submitit.JobEnvironment()
    except (RuntimeError, KeyError):
        return
    if env.cluster != "slurm":
        return
    usr = getattr(signal, "SIG" + submitit.slurm.slurm.SlurmJobEnvironment.USR_SIG, None)
    handler = signal.getsignal(usr) if usr is not None else None
    if callable(handler) and usr != signal.SIGUSR1:
        signal.signal(signal.SIGUSR1, handler)


def record_failure(spec: JobSpec, exc: BaseException, rank_errors: Optional[List[Dict[str, Any]]] = None) -> None:
    """The job's failure in its result file. Several processes: the error is the first rank's
    to fail (``rank_errors`` in order of time), not rank 0's report that a peer went away."""
    store = Store(Path(spec.run_dir))
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    record = {
        "status": FAILED, "kind": spec.kind, "id": spec.id, "method": spec.method, "column": spec.column,
        "dataset": spec.dataset, "task": spec.task, "seed": spec.seed, "config_hash": spec.config_hash,
        "error": f"{type(exc).__name__}: {exc}" if str(exc) or not isinstance(exc, KeyboardInterrupt)
        else "KeyboardInterrupt: interrupted (Ctrl-C or SIGINT); the next launch resumes it from its last checkpoint",
        "traceback": "".join(tb[-8:]), "log": _log_path(),
        "host": socket.gethostname(), "started": _STARTED.get("at"), "finished": now_iso(), **_slurm_info(),
    }
    if rank_errors:
        first = rank_errors[0]
        record.update(error=first["error"], traceback=first["traceback"], failed_rank=first["rank"],
                      rank_errors=[{k: e[k] for k in ("rank", "error", "time", "host")} for e in rank_errors])
        if first.get("log"):
            record["log"] = first["log"]
    store.write(spec.kind, spec.id, record)


RANK_ERRORS = "rank-errors"


def rank_errors_dir(spec: JobSpec) -> Path:
    """Where each failing process of a multi-process job leaves its error (rank<k>.json)."""
    return Store(Path(spec.run_dir)).job_dir(spec.kind, spec.id) / RANK_ERRORS


def _is_collective_error(exc: BaseException) -> bool:
    """A failure reported by the communication backend: a peer died, closed or timed out."""
    import torch.distributed as tdist

    if isinstance(exc, getattr(tdist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection closed",
                                                                     "Connection reset", "Timed out"))


def write_rank_error(folder: Path, exc: BaseException) -> None:
    """This process's error, for rank 0 to record (a peer's error is the cause of its own)."""
    from harness import distributed as dist
    from harness.data.cache import atomic_write_json

    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    try:
        atomic_write_json(folder / f"rank{dist.rank()}.json", {
            "rank": dist.rank(), "error": f"{type(exc).__name__}: {exc}", "traceback": "".join(tb[-8:]),
            "collective": _is_collective_error(exc), "time": time.time(), "host": socket.gethostname(),
            "log": _log_path()})
    except OSError as err:  # the failure itself must still propagate
        log.warning("job.rank_error_not_written folder=%s error=%s", folder, err)


def collect_rank_errors(folder: Path, exc: BaseException, wait_s: float = 10.0) -> List[Dict[str, Any]]:
    """Every rank's error in order of time, errors of the code before those of the backend.

    When rank 0 only saw a peer go away (a collective error), it waits up to ``wait_s`` for the
    rank that failed first to leave its error."""
    import json

    deadline = time.time() + (wait_s if _is_collective_error(exc) else 0.0)
    while True:
        errors = []
        for path in sorted(folder.glob("rank*.json")):
            try:
                errors.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        if any(not e.get("collective") for e in errors) or time.time() >= deadline:
            break
        time.sleep(0.2)
    return sorted(errors, key=lambda e: (bool(e.get("collective")), float(e.get("time", 0.0))))
