"""End-to-end checks of a SLURM cluster through submitit (no harness code).

Needs a reachable cluster, e.g. the local one from `scripts/slurm_local.sh up`
(`make slurm-up`); skipped otherwise. Partition: env HARNESS_SLURM_PARTITION
(default `debug`).

- dependencies: a job array submitted with `executor.batch()` and
  `--dependency=afterok:<A>` starts only after job A has ended;
- requeue: a `submitit.helpers.Checkpointable` job resumes and finishes after
  (a) submitit's preemption signal (USR2 by default in submitit >= 1.5, see
  `SlurmJobEnvironment.USR_SIG`; submitit sets `#SBATCH --signal=USR2@90`): the
  job calls its `checkpoint` method, dumps the returned DelayedSubmission and
  runs `scontrol requeue` on itself; the requeued job calls the checkpointed
  callable;
  (b) an external `scontrol requeue <jobid>`: no checkpoint is called (SLURM
  sends SIGTERM, which submitit ignores, then SIGKILL after KillWait) and the
  requeued job restarts from the original submission, so the callable resumes
  from its progress file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")
import cloudpickle  # noqa: E402  (a dependency of submitit)

from tests._sweeps import PARTITION, slurm_problem  # noqa: E402

pytestmark = pytest.mark.slurm


# The jobs unpickle these callables in a fresh interpreter where this test module
# is not importable: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


_PROBLEM = slurm_problem()
if _PROBLEM:
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"no SLURM cluster: {_PROBLEM}")]


def _executor(folder: Path, **extra):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, slurm_partition=PARTITION, **extra)
    return ex


def _squeue(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T %r"], capture_output=True, text=True)
    return out.stdout.strip()


def _wait(jobs, timeout_s: float) -> None:
    """Waits until every job has written its result file; cancels them and fails on timeout.

    job.result() alone has no timeout, and without slurmdbd (sacct) submitit cannot
    tell that a job died without writing a result.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(j.paths.result_pickle.exists() for j in jobs):
            return
        time.sleep(0.5)
    info = []
    for j in jobs:
        info.append(f"{j.job_id}: squeue={_squeue(j.job_id)!r}\nstderr:\n{j.stderr() or ''}")
        j.cancel(check=False)
    pytest.fail(f"jobs not finished after {timeout_s}s:\n" + "\n".join(info))


def _stamp(path: str, sleep_s: float) -> dict:
    start = time.time()
    time.sleep(sleep_s)
    end = time.time()
    rec = {"start": start, "end": end, "job": os.environ.get("SLURM_JOB_ID")}
    Path(path).write_text(json.dumps(rec))
    return rec


def test_array_waits_for_dependency(tmp_path, request):
    ex = _executor(tmp_path / "logs")
    job_a = ex.submit(_stamp, str(tmp_path / "a.json"), 2.0)
    request.addfinalizer(lambda: job_a.cancel(check=False))

    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{job_a.job_id}"})
    with ex.batch():
        array = [ex.submit(_stamp, str(tmp_path / f"b{i}.json"), 0.0) for i in range(2)]
    array_id = array[0].job_id.split("_")[0]
    request.addfinalizer(lambda: subprocess.run(["scancel", array_id], capture_output=True))
    assert {j.job_id.split("_")[0] for j in array} == {array_id}, "batch() should submit one array"
    # While A has not finished, the array is held back by the dependency.
    state = _squeue(array_id)
    if not job_a.paths.result_pickle.exists():  # checked after squeue: A was running then
        # (reason "None" right after submission, "Dependency" once the scheduler looked)
        assert state and all(ln.split()[1] == "PENDING" for ln in state.splitlines()), state

    _wait([job_a, *array], timeout_s=60)
    a = job_a.result()
    for j in array:
        b = j.result()
        assert b["start"] >= a["end"], f"array task {j.job_id} started before A ended: {b} vs {a}"
        assert json.loads((tmp_path / f"b{array.index(j)}.json").read_text()) == b


class _Counter(submitit.helpers.Checkpointable):
    """Counts to n_steps, appending one line per step to a progress file.

    A fresh start (or SLURM's requeue of the original submission) resumes from the
    progress file; a start from `checkpoint` gets the step to resume from as argument.
    """

    def __init__(self, progress: str, n_steps: int, step_s: float) -> None:
        self.progress = progress
        self.n_steps = n_steps
        self.step_s = step_s
        self.step = 0

    def __call__(self, start_step: int | None = None) -> dict:
        path = Path(self.progress)
        if start_step is None:
            lines = path.read_text().splitlines() if path.exists() else []
            self.step, source = len([ln for ln in lines if ln.startswith("step ")]), "file"
        else:
            self.step, source = start_step, "checkpoint"
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        with path.open("a") as f:
            f.write(f"run restart={restart} from={self.step} source={source}\n")
        while self.step < self.n_steps:
            time.sleep(self.step_s)
            # Record before counting: a signal in between makes the step run twice
            # after the resume rather than be skipped.
            with path.open("a") as f:
                f.write(f"step {self.step + 1} restart={restart}\n")
            self.step += 1
        return {"steps": self.step, "restart": restart, "source": source}

    def checkpoint(self, *args, **kwargs):
        with Path(self.progress).open("a") as f:
            f.write(f"checkpoint at={self.step}\n")
        return submitit.helpers.DelayedSubmission(self, start_step=self.step)


def _wait_for_steps(progress: Path, n: int, job, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if progress.exists() and sum(ln.startswith("step ") for ln in progress.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    job.cancel(check=False)
    pytest.fail(f"job {job.job_id} made no progress (squeue: {_squeue(job.job_id)!r})\n{job.stderr() or ''}")


@pytest.mark.parametrize("how", ["signal", "requeue"])
def test_checkpointable_job_resumes_after_requeue(tmp_path, how, request):
    ex = _executor(tmp_path / "logs")
    progress = tmp_path / "progress.txt"
    # Enough work left after the interruption (~9 s) that the job cannot finish
    # during SLURM's KillWait (submitit ignores the SIGTERM of `scontrol requeue`).
    n_steps = 40
    job = ex.submit(_Counter(str(progress), n_steps=n_steps, step_s=0.25))
    request.addfinalizer(lambda: job.cancel(check=False))
    _wait_for_steps(progress, 3, job, timeout_s=30)

    if how == "signal":
        # What SLURM sends before a timeout/preemption (--signal=USR2@90 set by submitit).
        sig = submitit.slurm.slurm.SlurmJobEnvironment.USR_SIG
        subprocess.run(["scancel", f"--signal={sig}", job.job_id], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job.job_id], check=True)

    _wait([job], timeout_s=50)
    res = job.result()
    log = progress.read_text()
    assert res["steps"] == n_steps, log
    assert res["restart"] >= 1, f"job was not requeued:\n{log}"
    runs = [ln for ln in log.splitlines() if ln.startswith("run ")]
    assert len(runs) >= 2, log
    steps = [int(ln.split()[1]) for ln in log.splitlines() if ln.startswith("step ")]
    # Resumed, not restarted from scratch: the second run did not redo step 1.
    assert steps.count(1) == 1, log
    assert steps[-1] == n_steps and set(steps) == set(range(1, n_steps + 1)), log
    if how == "signal":
        assert "checkpoint at=" in log and res["source"] == "checkpoint", log
    else:
        assert res["source"] == "file", log
