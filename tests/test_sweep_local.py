"""The local launcher end to end (`executor: debug`, in this process) on tiny sizes: a failing
cell is recorded and the others go on; a second run reuses what is done and runs only what
failed; bad inputs stop the sweep with one error before anything runs."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import torch

from tests._sweeps import COLORIZATION, SWEEP, cli, install_plugin, local_args, result, tiny

DIVERGING = COLORIZATION.replace("}", ", optimizer: {lr: 1.0e30}}")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    from harness.registry import METHODS

    METHODS.discover()
    before = set(METHODS._entries)
    install_plugin(tmp_path / "site", monkeypatch)
    if "colorization" not in METHODS._entries:
        METHODS.register("colorization", "harness_colorization:Colorization")
    yield
    for name in set(METHODS._entries) - before:
        METHODS._entries.pop(name)


def test_local_sweep_isolates_a_failure_and_reruns_only_it(tmp_path, cache_dir, small_scannet, plugin):
    out = tmp_path / "runs"
    run = out / "table1"
    args = ["sweep", SWEEP, *tiny(out, cache_dir), *local_args(), f"methods.colorization={DIVERGING}"]
    rc, text, err = cli(*args)
    assert rc == 1, text + err
    # lr = 1e30: the pre-training loss turns NaN from its second step; the trainer stops after
    # max_bad_steps (5) non-finite losses in a row.
    pre = result(run, "pretrain", "colorization__s0")
    assert pre["status"] == "failed" and pre["error"].startswith("FloatingPointError: pretrain: loss is nan"), pre
    cell = result(run, "finetune", "colorization__scannet-semseg__s0")
    assert cell["status"] == "failed" and cell["error"].startswith("pre-training colorization__s0 failed"), cell
    scratch = result(run, "finetune", "scratch__scannet-semseg__s0")
    assert scratch["status"] == "done" and 0.0 <= scratch["value"] <= 1.0
    assert datetime.fromisoformat(scratch["started"]) <= datetime.fromisoformat(scratch["finished"])
    # where the number was computed: tiny.yaml asks for device auto and backend torch
    assert scratch["device"].split(" ")[0] == ("cuda" if torch.cuda.is_available() else "cpu"), scratch
    assert (scratch["torch"], scratch["backend"]) == (torch.__version__, "torch"), scratch
    assert (pre.get("device"), pre.get("torch")) == (None, None), "a failed job records no runtime"
    assert "(1 ran, 0 reused, 2 failed)" in text, text
    report = (run / "report" / "table1.md").read_text()
    assert "colorization / scannet-semseg: failed: pre-training colorization__s0 failed" in report, report

    rc, text, _ = cli(*args, "--status")
    assert rc == 0
    assert "failed: FloatingPointError" in text and "1 done, 2 failed" in text, text

    # Second run: the done cell is reused (same result file), the two failed jobs run again.
    rc, text, _ = cli(*args)
    assert rc == 1 and "(0 ran, 1 reused, 2 failed)" in text, text
    assert result(run, "finetune", "scratch__scannet-semseg__s0") == scratch
    assert json.loads((run / "plan.json").read_text())["methods"] == ["scratch", "colorization"]


def test_a_rerun_does_not_read_the_previous_attempts_failure(tmp_path, cache_dir, small_scannet, plugin):
    """The pre-training failed last time (say, a bug since fixed): this launch runs it again, and
    its cell waits for the new attempt instead of failing on the old result, which is kept aside."""
    out = tmp_path / "runs"
    run = out / "table1"
    args = ["sweep", SWEEP, *tiny(out, cache_dir), *local_args(), f"methods.colorization={COLORIZATION}",
            "--methods", "colorization"]
    rc, text, err = cli(*args)
    assert rc == 0, text + err
    pre_path = run / "pretrain" / "colorization__s0" / "result.json"
    pre = json.loads(pre_path.read_text())
    pre_path.write_text(json.dumps({**pre, "status": "failed", "error": "KeyError: 'semantic'"}))
    (run / "cells" / "colorization__scannet-semseg__s0" / "result.json").unlink()
    rc, text, err = cli(*args)
    assert rc == 0 and "(2 ran, 0 reused, 0 failed)" in text, text + err
    assert result(run, "finetune", "colorization__scannet-semseg__s0")["status"] == "done"
    kept = list((run / "pretrain" / "colorization__s0" / "attempts").glob("result-*.json"))
    assert [json.loads(p.read_text())["error"] for p in kept] == ["KeyError: 'semantic'"]
    # the report of the YAML with other overrides shows those overrides' cells, not the last launch's
    rc, text, err = cli("report", SWEEP, *tiny(out, cache_dir), f"methods.colorization={COLORIZATION}", "seeds=[0,1]")
    assert rc == 0, text + err
    report = (run / "report" / "table1.md").read_text()
    assert "colorization / scannet-semseg: not run yet (waits for pre-training colorization__s1) (seed 1)" in report
    assert "scratch / scannet-semseg: not run yet (seeds 0, 1)" in report, report


def test_bad_inputs_stop_before_anything_runs(tmp_path, cache_dir):
    out = tmp_path / "runs"
    base = ["sweep", SWEEP, *tiny(out, cache_dir), *local_args()]
    rc, text, err = cli(*base, f"datasets.scannet.root={tmp_path / 'missing'}")
    assert rc == 2
    assert err.strip().splitlines() == [f"error: {SWEEP}: datasets.scannet.root: data directory "
                                        f"{tmp_path / 'missing'} does not exist"], err
    rc, text, err = cli(*base, "methods.nosuchmethod={}")
    assert rc == 2 and "Unknown method 'nosuchmethod'" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


ABORTING_JOB = """
import os, sys
import harness.launch as launch
from harness.sweep import JobSpec

def runner_that_aborts_in_native_code(spec):
    os.abort()

launch.RUNNERS["pretrain"] = runner_that_aborts_in_native_code
launch.Job()(JobSpec(kind="pretrain", id="m__s0", method="m", seed=0, run_dir=sys.argv[1], method_cfg={},
                     backbone={}, trainer={}, device="cpu", dataset="scannet", dataset_cfg={}))
"""


def test_a_job_killed_by_native_code_leaves_its_python_stack_in_stderr(tmp_path):
    # a segfault or abort in a compiled library (gloo, MinkowskiEngine) leaves no Python
    # traceback; the job's stderr log must still say where it was
    import signal
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", ABORTING_JOB, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr[-2000:])
    assert "Fatal Python error: Aborted" in proc.stderr
    assert "in runner_that_aborts_in_native_code" in proc.stderr


def test_a_job_runs_where_stderr_is_no_file(monkeypatch):
    # e.g. a notebook or a GUI that replaced sys.stderr: no crash handler, but the job runs
    import faulthandler
    import io
    import sys

    import harness.launch as launch

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    was = faulthandler.is_enabled()
    faulthandler.disable()
    try:
        launch._enable_faulthandler()
        assert not faulthandler.is_enabled()
    finally:
        if was:
            faulthandler.enable(file=sys.__stderr__)


def test_an_interrupted_job_says_so(tmp_path):
    from harness.launch import record_failure
    from harness.sweep import JobSpec
    from harness.store import Store

    spec = JobSpec(kind="finetune", id="m__c__s0", method="m", seed=0, run_dir=str(tmp_path), method_cfg={},
                   backbone={}, trainer={}, device="cpu", dataset="scannet", dataset_cfg={})
    record_failure(spec, KeyboardInterrupt())
    assert Store(tmp_path).read("finetune", "m__c__s0")["error"].startswith("KeyboardInterrupt: interrupted (Ctrl-C")
    record_failure(spec, ValueError("bad value"))
    assert Store(tmp_path).read("finetune", "m__c__s0")["error"] == "ValueError: bad value"


def test_a_job_that_died_without_recording_itself_is_named_by_its_last_exception_or_its_death():
    from harness.launchers import job_error_text

    failed = ("Job (task=0) failed during processing with trace:\n----------------------\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    raise ValueError('bad')\n"
              "ValueError: bad\n----------------------\nYou can check full logs with 'job.stderr(0)' and "
              "'job.stdout(0)'or at paths:\n  - /runs/28236_0_log.err\n  - /runs/28236_0_log.out")
    assert job_error_text(failed) == "ValueError: bad"
    stopped = failed.replace("ValueError: bad", "harness.train.Preempted: finetune: stopped by signal 15 at step 60; "
                                                "checkpoint saved")
    assert job_error_text(stopped).startswith("harness.train.Preempted: finetune: stopped by signal 15 at step 60")
    assert "resumes it" in job_error_text(stopped)
    gone = ("Job 28236_0 (task: 0) with path /runs/28236_0_result.pkl\nhas not produced any output (state: FAILED)\n"
            "Error stream produced:\n----------------------------------------\n2026-11-27 INFO harness.train ckpt.save")
    assert job_error_text(gone).startswith("the job's process ended without a result (has not produced any output "
                                           "(state: FAILED)): killed")


def test_a_second_process_of_a_running_job_waits_then_names_the_holder(tmp_path):
    import os
    import time

    from harness.launch import JobLocked, job_lock

    with job_lock(tmp_path, "scratch__scannet-semseg__s0"):
        t0 = time.monotonic()
        with pytest.raises(JobLocked, match=rf"job scratch__scannet-semseg__s0 is running in pid {os.getpid()} on "):
            with job_lock(tmp_path, "scratch__scannet-semseg__s0", wait_s=0.5):
                pass
        assert time.monotonic() - t0 >= 0.5
    with job_lock(tmp_path, "scratch__scannet-semseg__s0", wait_s=0):  # released
        pass


def test_an_unreadable_result_is_shown_as_such(tmp_path):
    from types import SimpleNamespace

    from harness.status import job_state
    from harness.store import Store

    store = Store(tmp_path)
    path = store.result_path("finetune", "a__b__s0")
    path.parent.mkdir(parents=True)
    path.write_text('{"status": "done", "val')
    r = store.read("finetune", "a__b__s0")
    assert r["status"] == "failed" and str(path) in r["error"] and "redoes the job" in r["error"]
    spec = SimpleNamespace(kind="finetune", id="a__b__s0", config_hash="h", workdir=path.parent)
    assert job_state(store, spec).startswith(f"failed: {path} is unreadable")
    assert not store.is_done("finetune", "a__b__s0", "h")
