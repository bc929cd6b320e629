"""Launchers: submit a sweep's jobs through submitit and follow them to the end.

``local``: jobs run as subprocesses of this machine (submitit's LocalExecutor) or in this
process (``executor: debug``), at most ``parallel`` at once; a fine-tuning job starts when its
method's pre-training result is in the store. Progress: one bar for the sweep and one per
running job, read from the job's metric log. Job failures are isolated: the failing job records
its error, the others go on, and jobs that depend on a failed pre-training are marked failed
without running.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import submitit

from harness.launch import Job
from harness.store import DONE, FAILED, Store
from harness.sweep import FINETUNE, PRETRAIN, JobSpec, Plan

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    ran: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    wall: float = 0.0


def pending_jobs(plan: Plan, store: Store) -> List[JobSpec]:
    return [j for j in plan.jobs if not store.is_done(j.kind, j.id, j.config_hash)]


def _progress_of(spec: JobSpec) -> Optional[tuple]:
    """(step, total) from a running job's metric log, when it has one."""
    name = "pretrain" if spec.kind == PRETRAIN else "finetune"
    path = spec.workdir / f"metrics-{name}.jsonl"
    total = (spec.task_cfg or spec.method_cfg or {}).get("steps") if spec.kind == FINETUNE else spec.method_cfg.get("steps")
    if not path.is_file() or not total:
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            lines = fh.read().decode(errors="ignore").strip().splitlines()
        step = json.loads(lines[-1]).get("step", 0) if lines else 0
    except (OSError, json.JSONDecodeError, IndexError):
        return None
    return int(step), int(total)


class LocalLauncher:
    def __init__(self, cfg: Any, console: Any = None):
        self.cfg = cfg
        self.console = console

    def run(self, plan: Plan, store: Store) -> SweepOutcome:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.cfg
        cpus = cfg.cpus or os.cpu_count() or 1
        parallel = max(1, min(cfg.parallel, cpus))
        threads = max(1, cpus // parallel)
        outcome = SweepOutcome()
        todo = pending_jobs(plan, store)
        outcome.skipped = [j.id for j in plan.jobs if j not in todo]
        for j in todo:
            j.threads = threads
        folder = store.root / "logs"
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cfg.executor)
        executor.update_parameters(timeout_min=cfg.timeout_min)
        running: Dict[str, tuple] = {}  # id -> (job, spec, start, task)
        waiting = list(todo)
        start = time.time()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False, disable=self.console is None) as progress:
            overall = progress.add_task(f"[bold]sweep {plan.sweep}", total=len(plan.jobs),
                                        completed=len(outcome.skipped))
            while waiting or running:
                for spec in list(waiting):
                    if len(running) >= parallel:
                        break
                    state = self._ready(spec, store, plan)
                    if state == "wait":
                        continue
                    waiting.remove(spec)
                    if state != "ok":
                        store.write(spec.kind, spec.id, {
                            "status": FAILED, "kind": spec.kind, "id": spec.id, "method": spec.method,
                            "column": spec.column, "dataset": spec.dataset, "task": spec.task, "seed": spec.seed,
                            "config_hash": spec.config_hash, "error": state, "log": None})
                        outcome.failed[spec.id] = state
                        progress.advance(overall)
                        continue
                    job = executor.submit(Job(), spec)
                    task = progress.add_task(f"  {spec.kind} {spec.id}", total=None)
                    running[spec.id] = (job, spec, time.time(), task)
                    log.info("sweep.submit id=%s job=%s", spec.id, job.job_id)
                for jid, (job, spec, t0, task) in list(running.items()):
                    prog = _progress_of(spec)
                    if prog:
                        progress.update(task, completed=prog[0], total=prog[1])
                    if not job.done():
                        continue
                    del running[jid]
                    progress.remove_task(task)
                    progress.advance(overall)
                    outcome.seconds[jid] = round(time.time() - t0, 1)
                    r = store.read(spec.kind, spec.id)
                    if r and r.get("status") == DONE and r.get("config_hash") == spec.config_hash:
                        outcome.ran.append(jid)
                    else:
                        err = (r or {}).get("error") or _job_error(job)
                        outcome.failed[jid] = err
                        if not r or r.get("status") != FAILED:  # died before it could record itself
                            store.write(spec.kind, spec.id, {
                                "status": FAILED, "kind": spec.kind, "id": spec.id, "method": spec.method,
                                "column": spec.column, "dataset": spec.dataset, "task": spec.task,
                                "seed": spec.seed, "config_hash": spec.config_hash, "error": err,
                                "log": str(job.paths.stderr) if hasattr(job, "paths") else None})
                if running:
                    time.sleep(0.5)
        outcome.wall = round(time.time() - start, 1)
        return outcome

    @staticmethod
    def _ready(spec: JobSpec, store: Store, plan: Plan) -> str:
        """ok | wait | an error message (the pre-training this job needs has failed)."""
        if spec.kind == PRETRAIN or spec.inline_pretrain:
            return "ok"
        r = store.read(PRETRAIN, spec.pretrain_id or "")
        if r and r.get("config_hash") == spec.pretrain_hash:
            if r.get("status") == DONE:
                return "ok"
            if r.get("status") == FAILED:
                return f"pre-training {spec.pretrain_id} failed: {r.get('error')}"
        if not any(p.id == spec.pretrain_id for p in plan.pretrain):
            return f"pre-training {spec.pretrain_id} is not part of this sweep"
        return "wait"


def _job_error(job: Any) -> str:
    try:
        exc = job.exception()
    except Exception as e:  # noqa: BLE001 - reading the error must not crash the sweep
        return f"job ended without a result ({type(e).__name__}: {e})"
    if exc is None:
        return "job ended without writing a result"
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


LAUNCHERS = {"local": LocalLauncher}
