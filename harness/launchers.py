"""Launchers: submit a sweep's jobs through submitit and follow them to the end.

``local``: jobs run as subprocesses of this machine (submitit's LocalExecutor) or in this
process (``executor: debug``), at most ``parallel`` at once; a fine-tuning job starts when its
method's pre-training result is in the store. Progress: one bar for the sweep and one per
running job, read from the job's metric log. Job failures are isolated: the failing job records
its error, the others go on, and jobs that depend on a failed pre-training are marked failed
without running.

``slurm``: ``SlurmLauncher`` below: pre-training jobs and fine-tuning array jobs with ``afterok``
dependencies through submitit's SLURM executor, followed through squeue and the store.

Both check their inputs (``validate``) before anything runs or is submitted.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

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
    # SLURM: job id of every job submitted by this launch; jobs of an earlier launch still queued
    # that this one follows instead of submitting again; requeues each job went through; jobs
    # that left the queue without a result; False when the launcher returned without waiting.
    submitted: Dict[str, str] = field(default_factory=dict)
    attached: Dict[str, str] = field(default_factory=dict)
    requeues: Dict[str, int] = field(default_factory=dict)
    lost: List[str] = field(default_factory=list)
    waited: bool = True


def pending_jobs(plan: Plan, store: Store) -> List[JobSpec]:
    return [j for j in plan.jobs if not store.is_done(j.kind, j.id, j.config_hash)]


def _progress_of(spec: JobSpec) -> Optional[tuple]:
    """(name, step, total) from a running job's newest metric log (every training loop writes
    ``metrics-<name>.jsonl`` lines with ``step`` and ``total``)."""
    logs = sorted(spec.workdir.glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime) \
        if spec.workdir.is_dir() else []
    if not logs:
        return None
    path = logs[-1]
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            lines = fh.read().decode(errors="ignore").strip().splitlines()
        record = json.loads(lines[-1]) if lines else {}
    except (OSError, json.JSONDecodeError, IndexError):
        return None
    if "total" not in record:
        return None
    return path.stem[len("metrics-"):], int(record.get("step", 0)), int(record["total"])


def validate_inputs(plan: Plan, sweep: Any) -> None:
    """Checks shared by every launcher, before anything runs: methods and tasks resolve to
    classes, every data directory a dataset config names exists (``root``, ``*_root``), and
    every weights file a method config names (``path``, ``*_weights``).

    Raises ``ConfigError`` naming the sweep file and the dotted key.
    """
    from harness.config import ConfigError, to_plain
    from harness.registry import METHODS, TASKS, RegistryError

    where = getattr(sweep, "path", "sweep")
    try:
        for name in plan.methods:
            METHODS.get(sweep.methods[name].method, where=f"{where}: methods.{name}")
            for key, value in _weight_files(to_plain(sweep.methods[name])):
                if not Path(str(value)).expanduser().is_file():
                    raise ConfigError(f"{where}: methods.{name}.{key}: weights file {value} does not exist")
        for spec in plan.finetune:
            TASKS.get(spec.task, where=f"{where}: columns.{spec.column}")
    except RegistryError as exc:
        raise ConfigError(str(exc)) from exc
    for name, cfg in sweep.datasets.items():
        for key in cfg:
            if key != "root" and not str(key).endswith("_root"):
                continue
            value = cfg[key]
            if value is None or value == "":
                continue
            path = Path(str(value)).expanduser()
            if not path.is_dir():
                what = "does not exist" if not path.exists() else "is not a directory"
                raise ConfigError(f"{where}: datasets.{name}.{key}: data directory {value} {what}")


def _leaves(cfg: Any, prefix: str = "") -> Iterable[Tuple[str, str, Any]]:
    """(dotted key, key, value) of every value of a plain nested config that is not a mapping."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if isinstance(value, dict):
                yield from _leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", str(key), value


def _weight_files(cfg: Any) -> List[tuple]:
    """(dotted key, value) of every file a method's config names for weights to load: ``path``
    (a published checkpoint) and ``*_weights`` keys (e.g. stage1.encoder_weights), when set."""
    return [(dotted, v) for dotted, k, v in _leaves(cfg)
            if isinstance(v, str) and v and (k == "path" or k.endswith("_weights"))]


def _batch_sizes(cfg: Any) -> List[tuple]:
    """(dotted key, value) of every ``batch_size`` in a job's plain config (nested stages too)."""
    return [(dotted, v) for dotted, k, v in _leaves(cfg) if k == "batch_size" and isinstance(v, int)]


def validate_batch_split(plan: Plan, processes: Callable[[JobSpec], int], layout: Callable[[JobSpec], str],
                         where: str) -> None:
    """Every batch size is global (all processes of a job together): each must divide evenly
    over the job's processes. Checked before anything runs (the trainer checks again)."""
    from harness.config import ConfigError

    for spec in plan.jobs:
        n = processes(spec)
        if n <= 1:
            continue
        cfg = spec.method_cfg if spec.kind == PRETRAIN else (spec.task_cfg or {})
        for key, value in _batch_sizes(cfg):
            if value % n:
                keys = f"methods.{spec.method}.{key}={value}" if spec.kind == PRETRAIN else \
                    f"tasks.{spec.task}.{key}={value} (or columns.{spec.column}.recipe.{key})"
                raise ConfigError(f"{where}: {keys}: the global batch of job {spec.id} does not "
                                  f"divide evenly over its {n} processes ({layout(spec)}); use a multiple of {n} "
                                  "or another process count")


def visible_gpu_indices(env: Optional[str], count: int) -> List[int]:
    """The GPU indices a ``CUDA_VISIBLE_DEVICES`` value names (``None``: all ``count``); CUDA
    ignores every entry from the first negative one on."""
    from harness.config import ConfigError

    if env is None:
        return list(range(count))
    names = [x.strip() for x in env.split(",") if x.strip()]
    if not all(x.lstrip("-").isdigit() for x in names):
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={env!r}: the local launcher hands GPUs to its jobs by index; "
                          "name them by index (0,1,...) rather than by UUID")
    return [int(x) for x in itertools.takewhile(lambda x: int(x) >= 0, names)]


def local_gpus() -> List[int]:
    """Indices of the GPUs this process may hand to local jobs (submitit's local executor sets
    each job's ``CUDA_VISIBLE_DEVICES`` from them): none without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return visible_gpu_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


class GpuPool:
    """Hands each local job ``per_job`` of ``gpus``, those the fewest running jobs use (ties:
    the lower index), so parallel jobs spread over a machine's GPUs and share them only when
    there are more jobs than GPUs."""

    def __init__(self, gpus: List[int], per_job: int):
        self.users = {g: 0 for g in gpus}
        self.per_job = per_job

    def take(self) -> List[int]:
        chosen = sorted(sorted(self.users, key=self.users.get)[:self.per_job])  # stable: ties keep order
        for g in chosen:
            self.users[g] += 1
        return chosen

    def give(self, gpus: List[int]) -> None:
        for g in gpus:
            self.users[g] -= 1


class LocalLauncher:
    def __init__(self, cfg: Any, console: Any = None):
        self.cfg = cfg
        self.console = console

    def gpus_per_job(self, device: str) -> int:
        """``launcher.local.gpus_per_node``, or where it is null, one GPU per process of a job
        when this machine has CUDA and ``device`` is not cpu (else none)."""
        explicit = _cfg_get(self.cfg, "gpus_per_node")
        if explicit is not None:
            return int(explicit)
        tasks = int(_cfg_get(self.cfg, "tasks_per_node") or 1)
        return tasks if device != "cpu" and local_gpus() else 0

    def validate(self, plan: Plan, sweep: Any) -> None:
        from harness.config import ConfigError

        validate_inputs(plan, sweep)
        where = getattr(sweep, "path", "sweep")
        tasks = int(_cfg_get(self.cfg, "tasks_per_node") or 1)
        if _cfg_get(self.cfg, "executor") not in ("local", "debug"):
            raise ConfigError(f"{where}: launcher.local.executor is {_cfg_get(self.cfg, 'executor')!r}; "
                              "it must be local or debug")
        if tasks < 1:
            raise ConfigError(f"{where}: launcher.local.tasks_per_node must be >= 1, got {tasks}")
        if tasks > 1 and _cfg_get(self.cfg, "executor") == "debug":
            raise ConfigError(f"{where}: launcher.local.tasks_per_node={tasks} needs launcher.local.executor: local "
                              "(the debug executor runs each job in this one process)")
        validate_batch_split(plan, lambda spec: tasks, lambda spec: f"launcher.local.tasks_per_node={tasks}", where)
        if _cfg_get(self.cfg, "executor") == "debug":
            return  # jobs run in this process and see its GPUs
        have = local_gpus()
        for device in sorted({spec.device for spec in plan.jobs}):
            gpus = self.gpus_per_job(device)
            if gpus < 0:
                raise ConfigError(f"{where}: launcher.local.gpus_per_node must be >= 0 or null, got {gpus}")
            if gpus > len(have):
                raise ConfigError(f"{where}: launcher.local.gpus_per_node={gpus}, but this machine has "
                                  f"{len(have)} GPU(s) to hand out")
            if device.startswith("cuda"):
                if not have:
                    raise ConfigError(f"{where}: device: {device}, but this machine has no GPU that torch can use "
                                      "(device: auto runs on the CPU there)")
                if gpus < tasks:
                    raise ConfigError(f"{where}: device: {device} with launcher.local.tasks_per_node={tasks} needs "
                                      f"one GPU per process, but launcher.local.gpus_per_node={gpus} (jobs see only "
                                      "the GPUs they are given); set it to "
                                      f"{tasks} or null")

    def run(self, plan: Plan, store: Store) -> SweepOutcome:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.cfg
        cpus = cfg.cpus or os.cpu_count() or 1
        parallel = max(1, min(cfg.parallel, cpus))
        tasks = max(1, int(_cfg_get(cfg, "tasks_per_node") or 1))
        threads = max(1, cpus // (parallel * tasks))  # torch threads of each process of a job
        outcome = SweepOutcome()
        todo = pending_jobs(plan, store)
        outcome.skipped = [j.id for j in plan.jobs if j not in todo]
        for j in todo:
            j.threads, j.tasks_per_node, j.nodes = threads, tasks, 1
            # an earlier attempt's result must not stand for this one (a cell would read its
            # pre-training's old failure while the pre-training runs again)
            store.archive(j.kind, j.id)
        folder = store.root / "logs"
        pools: Dict[str, GpuPool] = {}  # per device setting: the GPUs handed to its jobs
        if cfg.executor == "debug":
            executor: Any = _InProcessExecutor()
        else:
            executor = submitit.LocalExecutor(folder=folder / "%j")
            executor.update_parameters(timeout_min=cfg.timeout_min, tasks_per_node=tasks)
            for device in {spec.device for spec in todo}:
                per_job = self.gpus_per_job(device)
                if per_job:
                    pools[device] = GpuPool(local_gpus(), per_job)
        running: Dict[str, tuple] = {}  # id -> (job, spec, start, task)
        held: Dict[str, List[int]] = {}  # id -> the GPUs its job was given
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
                        pre = store.read(PRETRAIN, spec.pretrain_id or "") or {}
                        store.write(spec.kind, spec.id, {
                            "status": FAILED, "kind": spec.kind, "id": spec.id, "method": spec.method,
                            "column": spec.column, "dataset": spec.dataset, "task": spec.task, "seed": spec.seed,
                            "config_hash": spec.config_hash, "error": state, "log": pre.get("log")})
                        outcome.failed[spec.id] = state
                        progress.advance(overall)
                        continue
                    if cfg.executor != "debug":
                        pool = pools.get(spec.device)
                        held[spec.id] = pool.take() if pool else []
                        # submitit sets each job's CUDA_VISIBLE_DEVICES from these (none: "")
                        executor.update_parameters(gpus_per_node=len(held[spec.id]), visible_gpus=tuple(held[spec.id]))
                    job = executor.submit(Job(), spec)
                    task = progress.add_task(f"  {spec.kind} {spec.id}", total=None)
                    running[spec.id] = (job, spec, time.time(), task)
                    log.info("sweep.submit id=%s job=%s", spec.id, job.job_id)
                for jid, (job, spec, t0, task) in list(running.items()):
                    prog = _progress_of(spec)
                    if prog:
                        progress.update(task, description=f"  {spec.id} [{prog[0]}]", completed=prog[1],
                                        total=prog[2])
                    if not job.done():
                        continue
                    del running[jid]
                    if held.get(jid):
                        pools[spec.device].give(held.pop(jid))
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


class _InProcessJob:
    def __init__(self, job_id: str, result: Any = None, error: Optional[BaseException] = None):
        self.job_id, self._result, self._error = job_id, result, error

    def done(self) -> bool:
        return True

    def exception(self) -> Optional[BaseException]:
        return self._error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class _InProcessExecutor:
    """``executor: debug``: each job runs in this process when submitted. (submitit's
    DebugExecutor opens pdb on an exception, which stops a sweep at its first failing cell.)"""

    def __init__(self) -> None:
        self._n = 0

    def submit(self, fn: Any, *args: Any) -> _InProcessJob:
        self._n += 1
        job_id = f"inprocess-{os.getpid()}-{self._n}"
        try:
            return _InProcessJob(job_id, result=fn(*args))
        except Exception as exc:  # noqa: BLE001 - the job has recorded its failure; the sweep goes on
            log.warning("sweep.job_failed job=%s error=%s", job_id, exc)
            return _InProcessJob(job_id, error=exc)


def _job_error(job: Any) -> str:
    try:
        exc = job.exception()
    except Exception as e:  # noqa: BLE001 - reading the error must not crash the sweep
        return f"job ended without a result ({type(e).__name__}: {e})"
    if exc is None:
        return "job ended without writing a result"
    return job_error_text(str(exc)) or type(exc).__name__


_RAISED = re.compile(r"^\s*((?:\w+\.)*\w*(?:Error|Exception|Interrupt|Preempted|Exit)(?::.*)?)$")


def job_error_text(text: str) -> str:
    """What a job that died without recording itself ended with, from submitit's report of it:
    the last exception its traceback names (a checkpointed stop included), else why no result
    came (a process gone without output: killed, out of memory), not the report's log-path footer."""
    lines = text.strip().splitlines()
    raised = [m.group(1).strip() for m in map(_RAISED.match, lines) if m]
    if raised:
        last = raised[-1]
        if "Preempted" in last.split(":")[0]:
            return f"{last} (stopped by a signal; the next run of the sweep resumes it)"
        return last
    for line in lines:
        if "has not produced any output" in line or "NO PROCESS AND NO RESULT" in line:
            return (f"the job's process ended without a result ({line.strip()}): killed (SIGKILL, out of memory) "
                    "or its launcher stopped; the next run of the sweep resumes it from its last checkpoint")
    return lines[0].strip() if lines else ""


# ----------------------------------------------------------------------------------------------
# SLURM

SLURM_RECORDS = Path("slurm") / "jobs.json"  # under runs/<sweep>/: what each launch submitted
RESOURCE_KEYS = ("partition", "account", "qos", "constraint", "gpus_per_node", "cpus_per_task", "mem_gb",
                 "timeout_min", "nodes", "tasks_per_node")
STAGES = (PRETRAIN, FINETUNE)


def _cfg_get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def stage_resources(cfg: Any, stage: str) -> Dict[str, Any]:
    """``launcher.slurm`` with its ``pretrain`` / ``finetune`` overrides applied (null = inherit).

    ``source`` names the dotted key each value came from (for error messages).
    """
    from harness.config import to_plain

    over = _cfg_get(cfg, stage)
    res: Dict[str, Any] = {}
    source: Dict[str, str] = {}
    for key in RESOURCE_KEYS:
        value = _cfg_get(over, key) if over is not None else None
        if value is not None:
            res[key], source[key] = value, f"launcher.slurm.{stage}.{key}"
        else:
            res[key], source[key] = _cfg_get(cfg, key), f"launcher.slurm.{key}"
    extra = dict(to_plain(_cfg_get(cfg, "additional_parameters")) or {})
    extra.update(to_plain(_cfg_get(over, "additional_parameters")) or {} if over is not None else {})
    res["additional_parameters"] = extra
    res["source"] = source
    return res


def sbatch_flags(res: Dict[str, Any]) -> List[str]:
    """The sbatch options for ``res`` (what submitit writes as #SBATCH lines; for --test-only)."""
    flags = [f"--time={int(res['timeout_min'])}", f"--nodes={int(res['nodes'])}",
             f"--ntasks-per-node={int(res['tasks_per_node'])}", f"--cpus-per-task={int(res['cpus_per_task'])}"]
    for key in ("partition", "account", "qos", "constraint"):
        if res.get(key):
            flags.append(f"--{key}={res[key]}")
    if res.get("gpus_per_node"):
        flags.append(f"--gpus-per-node={int(res['gpus_per_node'])}")
    if res.get("mem_gb"):
        flags.append(f"--mem={int(res['mem_gb'])}GB")
    for key, value in res["additional_parameters"].items():
        flag = "--" + str(key).replace("_", "-")
        flags.append(flag if value is True else f"{flag}={value}")
    return flags


def _gres_gpus(gres: str) -> int:
    """GPUs in an sinfo GRES string such as ``gpu:a100:4(S:0-1)`` or ``gpu:8`` (0 for ``(null)``)."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def unmet_resources(res: Dict[str, Any], nodes: List[Tuple[int, int, str, str]]) -> List[str]:
    """Which of ``res`` no node of its partition can give, each as "<key>=<value>: <why>";
    ``nodes``: (CPUs, memory MB, GRES, features) of the partition's nodes, as sinfo lists them."""
    if not nodes:
        return []
    src = res["source"]
    out: List[str] = []
    cpus = int(res["cpus_per_task"]) * int(res["tasks_per_node"])
    if cpus > max(n[0] for n in nodes):
        out.append(f"{src['cpus_per_task']}={res['cpus_per_task']} x {src['tasks_per_node']}={res['tasks_per_node']}: "
                   f"{cpus} CPUs per node, its nodes have at most {max(n[0] for n in nodes)}")
    if res.get("mem_gb") and float(res["mem_gb"]) * 1024 > max(n[1] for n in nodes):
        out.append(f"{src['mem_gb']}={res['mem_gb']}: its nodes have at most {max(n[1] for n in nodes) / 1024:.1f} GB")
    if int(res["nodes"]) > len(nodes):
        out.append(f"{src['nodes']}={res['nodes']}: it has {len(nodes)} node{'s' if len(nodes) > 1 else ''}")
    gpus = max(_gres_gpus(n[2]) for n in nodes)
    if res.get("gpus_per_node") and int(res["gpus_per_node"]) > gpus:
        out.append(f"{src['gpus_per_node']}={res['gpus_per_node']}: its nodes have at most {gpus} GPUs")
    if res.get("constraint"):
        features = {f for n in nodes for f in n[3].split(",") if f and f != "(null)"}
        wanted = [f for f in str(res["constraint"]).replace("&", ",").replace("|", ",").split(",") if f]
        if any(f not in features for f in wanted):
            out.append(f"{src['constraint']}={res['constraint']}: its nodes' features are "
                       f"{', '.join(sorted(features)) or 'none'}")
    return out


def partition_nodes(partition: Optional[str]) -> List[Tuple[int, int, str, str]]:
    """(CPUs, memory MB, GRES, features) of each node of ``partition`` (the default one when
    None); empty when sinfo does not answer."""
    out = _run(["sinfo", "-h", "-N", *(["-p", partition] if partition else []), "-o", "%N|%c|%m|%G|%f"])
    if out is None or out.returncode != 0:
        return []
    nodes: Dict[str, Tuple[int, int, str, str]] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5 and parts[1].isdigit() and parts[2].rstrip("+").isdigit():
            nodes[parts[0]] = (int(parts[1]), int(parts[2].rstrip("+")), parts[3], parts[4])
    return list(nodes.values())


def executor_parameters(res: Dict[str, Any], cfg: Any, job_name: str) -> Dict[str, Any]:
    """``submitit.SlurmExecutor.update_parameters`` arguments for one submission."""
    params: Dict[str, Any] = {
        "time": int(res["timeout_min"]), "nodes": int(res["nodes"]), "ntasks_per_node": int(res["tasks_per_node"]),
        "cpus_per_task": int(res["cpus_per_task"]), "job_name": job_name,
        "signal_delay_s": int(_cfg_get(cfg, "signal_delay_s") or 90),
        "setup": _setup_lines(cfg), "additional_parameters": dict(res["additional_parameters"]),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if res.get(key):
            params[key] = str(res[key])
    if res.get("gpus_per_node"):
        params["gpus_per_node"] = int(res["gpus_per_node"])
    if res.get("mem_gb"):
        params["mem"] = f"{int(res['mem_gb'])}GB"
    return params


def _setup_lines(cfg: Any) -> List[str]:
    """Job preamble: the harness source checkout on PYTHONPATH (when not installed), then the
    sweep's ``launcher.slurm.setup`` lines."""
    import shlex

    lines = []
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():  # a source checkout, maybe not installed
        lines.append(f"export PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}}")
    lines += [str(x) for x in (_cfg_get(cfg, "setup") or [])]
    return lines


def gpu_hours(res: Dict[str, Any]) -> float:
    """GPU-hours one job may use: nodes x GPUs per node x the time limit."""
    return int(res["nodes"]) * int(res.get("gpus_per_node") or 0) * int(res["timeout_min"]) / 60.0


def _run(cmd: List[str], timeout_s: float = 30.0) -> Optional[Any]:
    import subprocess

    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("slurm.command_failed cmd=%s error=%s", " ".join(cmd[:2]), exc)
        return None


def squeue(job_ids: Iterable[str]) -> Optional[Dict[str, Dict[str, str]]]:
    """{job id: {state, reason, node}} of the given jobs still known to SLURM, array tasks one
    by one ("123_4"); None when squeue does not answer."""
    ids = sorted({str(j).split("_")[0] for j in job_ids})
    if not ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r|%N"])
    if out is None:
        return None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # every id has left the queue
            return {}
        log.warning("slurm.squeue rc=%s stderr=%s", out.returncode, out.stderr.strip())
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3:
            states[parts[0]] = {"state": parts[1], "reason": parts[2], "node": parts[3] if len(parts) > 3 else ""}
    return states


def sacct_state(job_id: str) -> Optional[str]:
    """The final state of a job from accounting (None without slurmdbd or when unknown)."""
    out = _run(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State"], timeout_s=15)
    if out is None or out.returncode != 0:
        return None
    states = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return states[-1].split()[0] if states else None


def scancel(job_ids: Iterable[str]) -> None:
    ids = [str(j) for j in job_ids]
    if ids:
        _run(["scancel", *ids])


def read_records(store: Store) -> Dict[str, Dict[str, Any]]:
    path = store.root / SLURM_RECORDS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("slurm.records_unreadable file=%s", path)
        return {}


def write_records(store: Store, records: Dict[str, Dict[str, Any]]) -> None:
    from harness.data.cache import atomic_write_json

    atomic_write_json(store.root / SLURM_RECORDS, records)


@dataclass
class Submission:
    """One sbatch: a pre-training job, or an array of fine-tuning cells sharing a dependency."""

    name: str
    stage: str  # pretrain | finetune
    specs: List[JobSpec]
    after: Optional[str] = None  # pre-training job id (of the plan) this array waits for (afterok)


def submissions(plan: Plan, todo: List[JobSpec], store: Store) -> List[Submission]:
    """How ``todo`` goes to SLURM: one job per pre-training, then one fine-tuning array per
    pre-training still to finish (afterok on it) and one array of cells whose checkpoint is
    ready or made inside the job (Scratch), without dependency."""
    ids = {j.id for j in todo}
    subs = [Submission(f"pre:{p.id}", PRETRAIN, [p]) for p in plan.pretrain if p.id in ids]
    groups: Dict[Optional[str], List[JobSpec]] = {}
    for f in plan.finetune:
        if f.id not in ids:
            continue
        ready = f.inline_pretrain or store.is_done(PRETRAIN, f.pretrain_id or "", f.pretrain_hash or "")
        groups.setdefault(None if ready else f.pretrain_id, []).append(f)
    for after, specs in groups.items():
        subs.append(Submission(f"ft:{after}" if after else "ft", FINETUNE, specs, after))
    return subs


def _launcher_failure(store: Store, spec: JobSpec, error: str, log_path: Optional[str]) -> None:
    """A failure the job could not record itself (it never ran, or died without a word)."""
    from harness.launch import now_iso

    store.write(spec.kind, spec.id, {
        "status": FAILED, "kind": spec.kind, "id": spec.id, "method": spec.method, "column": spec.column,
        "dataset": spec.dataset, "task": spec.task, "seed": spec.seed, "config_hash": spec.config_hash,
        "error": error, "log": log_path, "finished": now_iso(), "recorded_by": "launcher"})


def _log_tail(path: Optional[str], lines: int = 3) -> str:
    if not path or not Path(path).is_file():
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, Path(path).stat().st_size - 4096))
            text = fh.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(t.strip() for t in text[-lines:])


def _failed_pretrain(spec: JobSpec, store: Store) -> Optional[Dict[str, Any]]:
    if spec.kind != FINETUNE or spec.inline_pretrain or not spec.pretrain_id:
        return None
    r = store.read(PRETRAIN, spec.pretrain_id)
    if r and r.get("status") == FAILED and r.get("config_hash") == spec.pretrain_hash:
        return r
    return None


class SlurmLauncher:
    """Sweeps on a SLURM cluster through submitit's SLURM executor.

    - ``validate``: the cluster answers, every partition exists, ``sbatch --test-only`` accepts
      each stage's resources, data roots exist; before anything is submitted.
    - ``run``: one job per pre-training, fine-tuning cells as array jobs (at most
      ``array_parallelism`` running) with ``afterok`` on their method's pre-training job and
      ``kill-on-invalid-dep`` (a failed pre-training cancels its cells); Scratch's cells have
      no dependency. Submitted job ids go to ``runs/<sweep>/slurm/jobs.json`` (``--status`` maps
      cells to squeue with them). Re-launching submits only jobs without a current result that
      are not still queued from an earlier launch (those are followed; a queued job of an older
      config is cancelled). Then it follows the jobs (unless ``wait: false`` / ``--no-wait``):
      every ``poll_s`` it reads the store and squeue; a job is over when its result is stored,
      or when it has left the queue without one (it is then recorded as failed, with its log;
      without slurmdbd nothing else can tell a dead job from a running one). Ctrl-C stops
      following; the jobs go on.
    """

    def __init__(self, cfg: Any, console: Any = None):
        self.cfg = cfg
        self.console = console
        self.wait = bool(_cfg_get(cfg, "wait") if _cfg_get(cfg, "wait") is not None else True)

    # -- validation -----------------------------------------------------------------------------
    def validate(self, plan: Plan, sweep: Any) -> None:
        import shutil

        from harness.config import ConfigError

        validate_inputs(plan, sweep)
        where = getattr(sweep, "path", "sweep")
        self.validate_gpus(plan, where)
        for tool in ("sbatch", "squeue", "sinfo", "scancel"):
            if shutil.which(tool) is None:
                raise ConfigError(f"launcher slurm: '{tool}' is not on PATH; run from a SLURM login node "
                                  "(or start the local test cluster: make slurm-up)")
        out = _run(["sinfo", "-h", "-o", "%P"])
        if out is None or out.returncode != 0:
            msg = (out.stderr.strip() if out is not None else "no answer within 30 s")
            raise ConfigError(f"launcher slurm: the SLURM controller does not answer (sinfo: {msg})")
        partitions = [p.rstrip("*") for p in out.stdout.split()]
        for stage in self._stages(plan):
            res = stage_resources(self.cfg, stage)
            part = res.get("partition")
            if part and part not in partitions:
                raise ConfigError(f"{where}: {res['source']['partition']}: partition {part!r} does not exist on this "
                                  f"cluster (partitions: {', '.join(partitions) or 'none'})")
            flags = sbatch_flags(res)
            test = _run(["sbatch", "--test-only", *flags, "--wrap", "true"])
            if test is None or test.returncode != 0:
                msg = test.stderr.strip().replace("\n", "; ") if test is not None else "no answer within 30 s"
                unmet = unmet_resources(res, partition_nodes(part)) if test is not None else []
                at_fault = f"{'; '.join(unmet)} (partition {part or 'default'}). " if unmet else ""
                raise ConfigError(f"{where}: launcher.slurm ({stage} jobs): {at_fault}sbatch rejects "
                                  f"{' '.join(flags)}: {msg}")

        def processes(spec: JobSpec) -> int:
            res = stage_resources(self.cfg, spec.kind)
            return int(res["nodes"]) * int(res["tasks_per_node"])

        def layout(spec: JobSpec) -> str:
            res = stage_resources(self.cfg, spec.kind)
            return f"{res['source']['nodes']}={res['nodes']} x {res['source']['tasks_per_node']}={res['tasks_per_node']}"

        validate_batch_split(plan, processes, layout, where)

    def validate_gpus(self, plan: Plan, where: str) -> None:
        """``device: cuda`` needs a GPU for each process of a node (process k uses GPU k)."""
        from harness.config import ConfigError

        for stage in self._stages(plan):
            devices = sorted({spec.device for spec in plan.jobs if spec.kind == stage and spec.device.startswith("cuda")})
            res = stage_resources(self.cfg, stage)
            gpus, tasks = int(res.get("gpus_per_node") or 0), int(res["tasks_per_node"])
            if devices and gpus < tasks:
                raise ConfigError(f"{where}: device: {devices[0]}, but {res['source']['gpus_per_node']}={gpus} leaves "
                                  f"some of the {tasks} processes per node ({res['source']['tasks_per_node']}) "
                                  f"without a GPU ({stage} jobs); request at least {tasks} GPUs per node")

    @staticmethod
    def _stages(plan: Plan) -> List[str]:
        return [s for s, jobs in ((PRETRAIN, plan.pretrain), (FINETUNE, plan.finetune)) if jobs]

    # -- dry run --------------------------------------------------------------------------------
    def describe(self, plan: Plan, store: Store) -> tuple:
        """(per-job columns for the plan table, summary lines): how each job would be submitted."""
        todo = pending_jobs(plan, store)
        rows: Dict[str, Dict[str, str]] = {}
        hours = {PRETRAIN: 0.0, FINETUNE: 0.0}
        par = int(_cfg_get(self.cfg, "array_parallelism") or 1)
        subs = submissions(plan, todo, store)
        for sub in subs:
            res = stage_resources(self.cfg, sub.stage)
            n = len(sub.specs)
            how = "job" if n == 1 else f"array {sub.name} [{n}, {min(n, par)} at once]"
            gpus = int(res.get("gpus_per_node") or 0)
            what = (f"{res['nodes']}x{gpus} GPU, " if gpus else f"{res['nodes']} node, ") + \
                f"{res['tasks_per_node']} task x {res['cpus_per_task']} CPU, " + \
                (f"{res['mem_gb']} GB" if res.get("mem_gb") else "default mem")
            extra = ", ".join(f"{k} {res[k]}" for k in ("partition", "account", "qos", "constraint") if res.get(k))
            for spec in sub.specs:
                dep = f"afterok {sub.after}" if sub.after else ("inline pre-training" if spec.inline_pretrain else "—")
                rows[spec.id] = {"submit as": how, "resources": what + (f" ({extra})" if extra else ""),
                                 "time limit": f"{int(res['timeout_min'])} min", "waits for": dep}
                hours[sub.stage] += gpu_hours(res)
        total = hours[PRETRAIN] + hours[FINETUNE]
        lines = [f"{len(todo)} jobs to submit in {len(subs)} sbatch calls "
                 f"({sum(s.stage == PRETRAIN for s in subs)} pre-training jobs, "
                 f"{sum(s.stage == FINETUNE for s in subs)} fine-tuning submissions); "
                 f"{len(plan.jobs) - len(todo)} already done",
                 f"GPU-hours at the time limits: {total:.1f} (pre-training {hours[PRETRAIN]:.1f}, "
                 f"fine-tuning {hours[FINETUNE]:.1f})"]
        return rows, lines

    # -- submission -----------------------------------------------------------------------------
    def run(self, plan: Plan, store: Store) -> SweepOutcome:
        start = time.time()
        outcome = SweepOutcome(waited=self.wait)
        todo = pending_jobs(plan, store)
        todo_ids = {j.id for j in todo}
        outcome.skipped = [j.id for j in plan.jobs if j.id not in todo_ids]
        records = read_records(store)
        queue = squeue(r["job_id"] for r in records.values()) if records else {}
        if queue is None:
            from harness.config import ClusterError

            raise ClusterError("squeue does not answer: cannot tell which jobs of an earlier launch are still queued; "
                               "nothing submitted")
        jobids: Dict[str, str] = {}
        stale = []
        for spec in todo:
            rec = records.get(spec.id)
            if not rec or rec.get("job_id") not in queue:
                continue
            if rec.get("config_hash") == spec.config_hash:
                jobids[spec.id] = outcome.attached[spec.id] = rec["job_id"]
            else:
                stale.append(rec["job_id"])
        if stale:
            log.warning("slurm.cancel_stale jobs=%s reason=config-changed", ",".join(stale))
            scancel(stale)
        folder = store.root / "logs" / "%j"
        for sub in submissions(plan, [j for j in todo if j.id not in jobids], store):
            res = stage_resources(self.cfg, sub.stage)
            params = executor_parameters(res, self.cfg, f"{plan.sweep}/{sub.name}")
            if sub.after:
                params["additional_parameters"]["dependency"] = f"afterok:{jobids[sub.after]}"
                params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(_cfg_get(self.cfg, "max_num_timeout")))
            executor.update_parameters(array_parallelism=int(_cfg_get(self.cfg, "array_parallelism")), **params)
            specs = [self._for_slurm(s, res) for s in sub.specs]
            for s in specs:
                store.archive(s.kind, s.id)  # an earlier attempt's result must not stand for this one
            if len(specs) == 1:
                jobs = [executor.submit(Job(), specs[0])]
            else:
                with executor.batch():
                    jobs = [executor.submit(Job(), s) for s in specs]
            from harness.launch import now_iso

            for spec, job in zip(specs, jobs):
                jobids[spec.id] = outcome.submitted[spec.id] = job.job_id
                records[spec.id] = {"job_id": job.job_id, "kind": spec.kind, "config_hash": spec.config_hash,
                                    "submitted": now_iso(), "submission": sub.name, "log": str(job.paths.stderr),
                                    "after": jobids.get(sub.after) if sub.after else None}
            write_records(store, records)  # after each sbatch: the record never misses a queued job
            log.info("slurm.submit name=%s jobs=%s after=%s", sub.name, ",".join(j.job_id for j in jobs),
                     jobids.get(sub.after) if sub.after else "-")
        if self.console is not None:
            for sid, jid in {**outcome.attached, **outcome.submitted}.items():
                how = "still queued from an earlier launch" if sid in outcome.attached else "submitted"
                self.console.print(f"  {sid}: SLURM job {jid} ({how})", highlight=False)
        if self.wait and jobids:
            self._follow(plan, store, jobids, outcome)
        outcome.wall = round(time.time() - start, 1)
        return outcome

    @staticmethod
    def _for_slurm(spec: JobSpec, res: Dict[str, Any]) -> JobSpec:
        from dataclasses import replace

        # threads=0: the job uses its CPU allocation (SLURM_CPUS_PER_TASK); absolute run dir.
        return replace(spec, run_dir=str(Path(spec.run_dir).resolve()), threads=0, nodes=int(res["nodes"]),
                       tasks_per_node=int(res["tasks_per_node"]))

    # -- following ------------------------------------------------------------------------------
    def _follow(self, plan: Plan, store: Store, jobids: Dict[str, str], outcome: SweepOutcome) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        poll = float(_cfg_get(self.cfg, "poll_s") or 10.0)
        unreachable_s = float(_cfg_get(self.cfg, "unreachable_min") or 10.0) * 60
        max_wait_s = float(_cfg_get(self.cfg, "max_wait_min") or 0.0) * 60
        started = time.monotonic()
        grace = max(2 * poll, 10.0)  # a result written just before the job left the queue is visible by then
        records = read_records(store)
        specs = {s.id: s for s in plan.jobs if s.id in jobids}
        open_ids = set(specs)
        gone_since: Dict[str, float] = {}
        last_answer = time.monotonic()
        bars: Dict[str, Any] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False, disable=self.console is None) as progress:
            overall = progress.add_task(f"[bold]sweep {plan.sweep}", total=len(plan.jobs),
                                        completed=len(outcome.skipped))
            try:
                while open_ids:
                    queue = squeue(jobids[i] for i in open_ids)
                    now = time.monotonic()
                    if queue is not None:
                        last_answer = now
                    elif now - last_answer > unreachable_s:
                        log.warning("slurm.unreachable minutes=%.0f: stop following; the jobs keep running "
                                    "(harness sweep ... --status)", unreachable_s / 60)
                        outcome.waited = False
                        break
                    counts = {"queued": 0, "running": 0}
                    for sid in sorted(open_ids):
                        spec, jid = specs[sid], jobids[sid]
                        state = self._poll_one(spec, jid, store, queue, gone_since, now, grace, records, outcome)
                        if state in ("done", "failed"):
                            open_ids.discard(sid)
                            progress.advance(overall)
                            if sid in bars:
                                progress.remove_task(bars.pop(sid))
                            continue
                        counts[state] = counts.get(state, 0) + 1
                        if state == "running":
                            prog = _progress_of(spec)
                            if sid not in bars:
                                bars[sid] = progress.add_task(f"  {spec.kind} {sid} [{jid}]", total=None)
                            if prog:
                                progress.update(bars[sid], completed=prog[1], total=prog[2])
                    progress.update(overall, description=f"[bold]sweep {plan.sweep}[/bold]: {counts['queued']} queued, "
                                    f"{counts['running']} running, {len(outcome.ran) + len(outcome.skipped)} done, "
                                    f"{len(outcome.failed)} failed")
                    if open_ids and max_wait_s and time.monotonic() - started > max_wait_s:
                        log.warning("slurm.max_wait minutes=%.1f open=%s: stop following; the jobs keep running "
                                    "(harness sweep ... --status)", max_wait_s / 60, ",".join(sorted(open_ids)))
                        outcome.waited = False
                        break
                    if open_ids:
                        time.sleep(poll)
            except KeyboardInterrupt:
                log.warning("slurm.stop_following: the jobs keep running (harness sweep ... --status; scancel to stop)")
                outcome.waited = False

    def _poll_one(self, spec: JobSpec, jid: str, store: Store, queue: Optional[Dict[str, Dict[str, str]]],
                  gone_since: Dict[str, float], now: float, grace: float, records: Dict[str, Any],
                  outcome: SweepOutcome) -> str:
        """done | failed (both final, recorded in ``outcome``) | queued | running | waiting."""
        r = store.read(spec.kind, spec.id)
        if r and r.get("config_hash") == spec.config_hash and r.get("status") in (DONE, FAILED):
            self._resolve(spec, r, outcome)
            return "done" if r["status"] == DONE else "failed"
        log_path = (records.get(spec.id) or {}).get("log")
        entry = queue.get(jid) if queue else None
        if entry is not None:
            gone_since.pop(spec.id, None)
            if entry["reason"] == "DependencyNeverSatisfied":  # a site without kill-on-invalid-dep
                scancel([jid])
            else:
                return "running" if entry["state"] == "RUNNING" else "queued"
        if queue is None:
            return "waiting"  # squeue did not answer: nothing can be concluded
        pre = _failed_pretrain(spec, store)
        if pre is not None:
            err = f"pre-training {spec.pretrain_id} failed: {pre.get('error')}"
            _launcher_failure(store, spec, err, pre.get("log"))
            self._resolve(spec, store.read(spec.kind, spec.id) or {"status": FAILED, "error": err}, outcome)
            return "failed"
        first = gone_since.setdefault(spec.id, now)
        if now - first < grace:
            return "waiting"
        acct = sacct_state(jid)
        tail = _log_tail(log_path)
        err = (f"SLURM job {jid} left the queue without writing a result"
               + (f" (state {acct})" if acct else " (cancelled, killed for time or memory, or its node failed)")
               + (f"; log ends: {tail}" if tail else ""))
        _launcher_failure(store, spec, err, log_path)
        outcome.lost.append(spec.id)
        self._resolve(spec, store.read(spec.kind, spec.id) or {"status": FAILED, "error": err}, outcome)
        return "failed"

    @staticmethod
    def _resolve(spec: JobSpec, r: Dict[str, Any], outcome: SweepOutcome) -> None:
        if r.get("status") == DONE:
            outcome.ran.append(spec.id)
            if r.get("wall_seconds") is not None:
                outcome.seconds[spec.id] = float(r["wall_seconds"])
        else:
            outcome.failed[spec.id] = str(r.get("error"))
        if r.get("slurm_restarts"):
            outcome.requeues[spec.id] = int(r["slurm_restarts"])

    # -- status ---------------------------------------------------------------------------------
    @staticmethod
    def queue_states(plan: Plan, store: Store) -> Dict[str, str]:
        return slurm_queue_states(plan, store)


def slurm_queue_states(plan: Plan, store: Store) -> Dict[str, str]:
    """State of each job of ``plan`` submitted to SLURM and without a current result, from
    squeue (and sacct where accounting runs): "queued (job 12_0, Dependency)",
    "running (job 13 on node1, step 40/300)", "lost: ..." ; {} when nothing was submitted."""
    records = read_records(store)
    live = []
    for spec in plan.jobs:
        rec = records.get(spec.id)
        if rec and rec.get("config_hash") == spec.config_hash:
            r = store.read(spec.kind, spec.id)
            if not (r and r.get("config_hash") == spec.config_hash and r.get("status") in (DONE, FAILED)):
                live.append((spec, rec))
    if not live:
        return {}
    queue = squeue(rec["job_id"] for _, rec in live)
    states: Dict[str, str] = {}
    for spec, rec in live:
        jid = rec["job_id"]
        if queue is None:
            states[spec.id] = f"submitted (job {jid}; squeue does not answer)"
            continue
        entry = queue.get(jid)
        if entry is not None and entry["reason"] != "DependencyNeverSatisfied":
            if entry["state"] == "RUNNING":
                prog = _progress_of(spec)
                states[spec.id] = f"running (job {jid} on {entry['node']}" + (f", {prog[0]} step {prog[1]}/{prog[2]})" if prog else ")")
            elif entry["state"] == "PENDING":
                states[spec.id] = f"queued (job {jid}, {entry['reason']})"
            else:
                states[spec.id] = f"{entry['state'].lower()} (job {jid})"
            continue
        pre = _failed_pretrain(spec, store)
        if pre is not None:
            states[spec.id] = f"failed: pre-training {spec.pretrain_id} failed: {pre.get('error')}"
            continue
        acct = sacct_state(jid)
        states[spec.id] = (f"lost: job {jid} " + (f"ended {acct}" if acct else "left the queue")
                           + f" without a result (log: {rec.get('log')})")
    return states


LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher}
