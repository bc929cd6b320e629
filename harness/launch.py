"""Job functions and launchers: the same picklable job runs in-process, locally or on SLURM.

``Job`` is a submitit ``Checkpointable``: on preemption or time-out SLURM signals it, the
training loop saves its checkpoint at the end of the current step, and submitit requeues a fresh
``Job`` that resumes from that checkpoint. A job writes its ``result.json`` (done, or failed
with its error and log path) and never decides anything from the scheduler's state.

Launchers express the pre-train -> fine-tune dependency themselves: locally by starting a
fine-tuning job only when its pre-training result is in the store; on SLURM with ``afterok``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
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
    """Torch threads: the spec's, else the job's CPU allocation (SLURM), else all CPUs."""
    if spec.threads:
        return spec.threads
    for var in ("SLURM_CPUS_PER_TASK", "SUBMITIT_CPUS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def _log_path() -> Optional[str]:
    try:
        env = submitit.JobEnvironment()
        return str(env.paths.stderr)
    except RuntimeError:
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


def run_pretrain(spec: JobSpec) -> Dict[str, Any]:
    """Pre-train ``spec.method`` and export its backbone; returns (and stores) the result."""
    from harness.config import plugin_config
    from harness.registry import METHODS

    store = Store(Path(spec.run_dir))
    workdir = store.job_dir(PRETRAIN, spec.id)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    method_cfg = plugin_config("method", spec.method, spec.method_cfg)
    method = METHODS.get(spec.method)(method_cfg)
    ctx = _build_context(spec, spec.dataset, spec.dataset_cfg, None, workdir)
    torch_seed(spec.seed)
    path = method.pretrain(ctx)
    from harness import distributed as dist

    result = {"status": DONE, "kind": PRETRAIN, "id": spec.id, "method": spec.method, "seed": spec.seed,
              "checkpoint": str(path), "config_hash": spec.config_hash, "wall_seconds": round(time.time() - start, 2),
              "method_version": method_cfg.version, **_provenance(), **ctx.extra}
    if dist.is_main():
        store.write(PRETRAIN, spec.id, result)
    return result


def run_finetune(spec: JobSpec) -> Dict[str, Any]:
    """Fine-tune from the method's checkpoint on one (dataset, task) column; store the metric."""
    from harness.config import plugin_config
    from harness.registry import TASKS

    store = Store(Path(spec.run_dir))
    if spec.inline_pretrain:
        _ensure_inline_pretrain(spec, store)
    pre = store.read(PRETRAIN, spec.pretrain_id)
    if not pre or pre.get("status") != DONE or pre.get("config_hash") != spec.pretrain_hash:
        raise RuntimeError(f"pre-training {spec.pretrain_id} has no current result in {store.root}/pretrain; "
                           f"it must finish before {spec.id}")
    workdir = store.job_dir(FINETUNE, spec.id)
    workdir.mkdir(parents=True, exist_ok=True)
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
              "method_version": pre.get("method_version"), **_provenance(), **ctx.extra}
    if dist.is_main():
        store.write(FINETUNE, spec.id, result)
    return result


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
        run_pretrain(pspec)


def torch_seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _provenance() -> Dict[str, Any]:
    from harness.context import git_commit

    return {"git_commit": git_commit(), "host": socket.gethostname(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "log": _log_path()}


RUNNERS: Dict[str, Callable[[JobSpec], Dict[str, Any]]] = {PRETRAIN: run_pretrain, FINETUNE: run_finetune}


class Job(submitit.helpers.Checkpointable):
    """The job function of every launcher: runs one ``JobSpec`` and records success or failure."""

    def __call__(self, spec: JobSpec) -> Dict[str, Any]:
        setup_logging()
        _set_threads(job_threads(spec))
        from harness import distributed as dist
        from harness.train import Preempted

        dist.init_from_env()
        try:
            return RUNNERS[spec.kind](spec)
        except Preempted:
            raise
        except BaseException as exc:
            if dist.is_main():
                record_failure(spec, exc)
            raise

    def checkpoint(self, spec: JobSpec) -> submitit.helpers.DelayedSubmission:
        # The training loop has saved its state; a fresh Job resumes from it.
        return submitit.helpers.DelayedSubmission(Job(), spec)


def record_failure(spec: JobSpec, exc: BaseException) -> None:
    store = Store(Path(spec.run_dir))
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    store.write(spec.kind, spec.id, {
        "status": FAILED, "kind": spec.kind, "id": spec.id, "method": spec.method, "column": spec.column,
        "dataset": spec.dataset, "task": spec.task, "seed": spec.seed, "config_hash": spec.config_hash,
        "error": f"{type(exc).__name__}: {exc}", "traceback": "".join(tb[-8:]), "log": _log_path(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
