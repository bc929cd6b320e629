"""`harness sweep --launcher slurm` on a real cluster (CI: the local one-node cluster from
scripts/slurm_local.sh, `make slurm-up`); skipped when no cluster answers.

Tiny sweeps (Scratch + the colourisation example plugin, ScanNet semantic segmentation, a few
steps on one small scene, one CPU per job), each checked against the same sweep run locally
in this process with one torch thread (bit-identical on CPU):
- a failing cell (pre-training diverges: lr = 1e30) is recorded with its error and log, the
  other cell finishes, `--status` and the report show it; re-launching with the fix submits
  only the failed jobs; the final table equals the local one; the fine-tuning job started
  after its pre-training job ended (recorded times, afterok in its sbatch script);
- a fine-tuning array of three identical cells, mid-training: one task gets
  `scancel --signal=USR1`, one `scontrol requeue`; both resume from their checkpoints and end
  with the metric of the uninterrupted run; the third is cancelled (`scancel`): it leaves the
  queue without a result, the launcher records it as lost, and the re-launch submits only it
  and resumes it to the same metric;
- bad inputs (partition, per-stage partition, resources sbatch rejects, data root, method):
  one error line, exit status 2, nothing submitted.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests._sweeps import (COLORIZATION, PARTITION, SWEEP, cli, install_plugin, local_args, records, result,
                           slurm_args, slurm_problem, tiny)

pytestmark = pytest.mark.slurm
_PROBLEM = slurm_problem()
if _PROBLEM:
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"no SLURM cluster: {_PROBLEM}")]

DIVERGING = COLORIZATION.replace("}", ", optimizer: {lr: 1.0e30}}")
FOLLOW = ["launcher.slurm.max_wait_min=4"]  # the launcher stops following (and the test fails) after 4 min
CELLS = ("scratch__scannet-semseg__s0", "colorization__scannet-semseg__s0")


def _cancel(run: Path) -> None:
    ids = [r["job_id"] for r in records(run).values()]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    from harness.registry import METHODS

    METHODS.discover()
    before = set(METHODS._entries)
    mp = pytest.MonkeyPatch()
    install_plugin(tmp_path_factory.mktemp("site"), mp)
    if "colorization" not in METHODS._entries:
        METHODS.register("colorization", "harness_colorization:Colorization")
    yield
    for name in set(METHODS._entries) - before:
        METHODS._entries.pop(name)
    mp.undo()


@pytest.fixture(scope="module")
def failing_then_fixed(tmp_path_factory, cache_dir, small_scannet, plugin):
    """Launch A (colorization diverges) followed to its end, its --status; launch B with the fix
    (--no-wait), the local reference run of the fixed sweep here while B's jobs run, then B
    again to follow (or collect) them."""
    tmp = tmp_path_factory.mktemp("sweep")
    out, run = tmp / "runs", tmp / "runs" / "table1"
    common = ["sweep", SWEEP, *tiny(out, cache_dir), *slurm_args(), *FOLLOW]
    bad, good = [*common, f"methods.colorization={DIVERGING}"], [*common, f"methods.colorization={COLORIZATION}"]
    try:
        launch_a = cli(*bad, "--launcher", "slurm")
        records_a = records(run)
        results_a = {i: result(run, "finetune", i) for i in CELLS}
        results_a["colorization__s0"] = result(run, "pretrain", "colorization__s0")
        status_a = cli(*bad, "--status")
        report_a = (run / "report" / "table1.md").read_text()
        submit_b = cli(*good, "--launcher", "slurm", "--no-wait")
        records_b = records(run)
        local = cli("sweep", SWEEP, *tiny(tmp / "local", cache_dir), *local_args(),
                    f"methods.colorization={COLORIZATION}")
        collect_b = cli(*good, "--launcher", "slurm")
    finally:
        _cancel(run)
    return {"run": run, "local": tmp / "local" / "table1", "launch_a": launch_a, "records_a": records_a,
            "results_a": results_a, "status_a": status_a, "report_a": report_a, "submit_b": submit_b,
            "records_b": records_b, "local_cli": local, "collect_b": collect_b}


def test_failure_is_isolated_recorded_and_shown(failing_then_fixed):
    f = failing_then_fixed
    rc, text, err = f["launch_a"]
    assert rc == 1, text + err
    assert "3 jobs submitted, 0 followed" in text and "(1 ran, 0 reused, 2 failed)" in text, text
    r = f["results_a"]
    assert r["scratch__scannet-semseg__s0"]["status"] == "done"
    pre = r["colorization__s0"]
    assert pre["status"] == "failed" and pre["error"].startswith("FloatingPointError: pretrain: loss is nan"), pre
    assert pre["slurm_job_id"] == f["records_a"]["colorization__s0"]["job_id"]
    assert "FloatingPointError" in Path(pre["log"]).read_text()  # the job's own log, recorded in the store
    cell = r["colorization__scannet-semseg__s0"]
    assert cell["status"] == "failed" and cell["error"].startswith("pre-training colorization__s0 failed: "
                                                                   "FloatingPointError"), cell
    assert cell["log"] == pre["log"]
    rc, status, _ = f["status_a"]
    assert rc == 0 and "1 done, 2 failed" in status, status
    assert re.search(r"colorization__s0\s*│ pretrain │ failed: FloatingPointError", status), status
    assert "colorization / scannet-semseg: failed: pre-training colorization__s0 failed" in f["report_a"]


def test_relaunch_submits_only_what_failed(failing_then_fixed):
    f = failing_then_fixed
    rc, text, err = f["submit_b"]
    assert rc == 0 and "2 jobs submitted, 0 followed" in text, text + err
    # the printed follow-up command pastes into a shell: overrides quoted, the launcher kept
    follow = " ".join(text.split())
    assert "--launcher slurm --status" in follow and f"'methods.colorization={COLORIZATION}'" in follow, text
    rc, text, err = f["collect_b"]
    assert rc == 0 and "0 failed)" in text, text + err
    assert "0 jobs submitted" in text or "(0 ran, 3 reused" in text, text  # followed B's jobs, or they had ended
    a, b = f["records_a"], f["records_b"]
    assert b["scratch__scannet-semseg__s0"] == a["scratch__scannet-semseg__s0"]  # not submitted again
    for jid in ("colorization__s0", "colorization__scannet-semseg__s0"):
        assert b[jid]["job_id"] != a[jid]["job_id"]
    # The failed attempt's result was moved aside, not overwritten in place.
    attempts = list((f["run"] / "pretrain" / "colorization__s0" / "attempts").glob("result-*.json"))
    assert [json.loads(p.read_text())["status"] for p in attempts] == ["failed"]


def test_slurm_table_equals_local(failing_then_fixed):
    f = failing_then_fixed
    rc, text, err = f["local_cli"]
    assert rc == 0, text + err
    for cell in CELLS:
        s, loc = result(f["run"], "finetune", cell), result(f["local"], "finetune", cell)
        assert s["status"] == loc["status"] == "done"
        assert s["value"] == loc["value"] and s["metrics"]["train_loss"] == loc["metrics"]["train_loss"], cell
        assert s["host"] and s["slurm_job_id"] and "slurm_job_id" not in loc
    assert (f["run"] / "report" / "table1.csv").read_text() == (f["local"] / "report" / "table1.csv").read_text()


def test_finetune_job_waited_for_its_pretraining(failing_then_fixed):
    f = failing_then_fixed
    rec = records(f["run"])
    pre_job = rec["colorization__s0"]["job_id"]
    cell = rec["colorization__scannet-semseg__s0"]
    assert cell["after"] == pre_job
    script = (Path(cell["log"]).parent / f"{cell['job_id']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{pre_job}" in script and "#SBATCH --kill-on-invalid-dep=yes" in script
    pre = result(f["run"], "pretrain", "colorization__s0")
    fine = result(f["run"], "finetune", "colorization__scannet-semseg__s0")
    assert datetime.fromisoformat(fine["started"]) > datetime.fromisoformat(pre["finished"]), (pre, fine)


def _capture(fn, errors: list) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - reported by the test's main thread
        errors.append(exc)


def _run_at_step(commands: dict, n: int, timeout_s: float) -> None:
    """Run each command as soon as its metrics file has ``n`` steps (each job on its own)."""
    deadline = time.monotonic() + timeout_s
    waiting = dict(commands)
    while waiting and time.monotonic() < deadline:
        for path in [p for p in waiting if p.is_file() and len(p.read_text().splitlines()) >= n]:
            subprocess.run(waiting.pop(path), check=True)
        time.sleep(0.05)
    if waiting:
        pytest.fail(f"{', '.join(map(str, waiting))}: fewer than {n} steps after {timeout_s} s")


def test_signalled_requeued_and_cancelled_jobs_resume_to_the_same_metric(tmp_path, cache_dir, small_scannet):
    steps = 40
    out, run = tmp_path / "runs", tmp_path / "runs" / "table1"
    # Three identical cells (same recipe, same config hash) in one fine-tuning array of Scratch.
    copies = ["columns.twin={dataset: scannet, task: semseg}", "columns.third={dataset: scannet, task: semseg}"]
    args = ["sweep", SWEEP, *tiny(out, cache_dir, steps=steps), *slurm_args(), *FOLLOW, *copies,
            "trainer.checkpoint_every=10"]
    cells = ["scratch__scannet-semseg__s0", "scratch__twin__s0", "scratch__third__s0"]
    metrics = [run / "cells" / c / "metrics-finetune.jsonl" for c in cells]
    try:
        rc, text, err = cli(*args, "--launcher", "slurm", "--no-wait")
        assert rc == 0 and "3 jobs submitted" in text, text + err
        jobs = [records(run)[c]["job_id"] for c in cells]
        assert len({j.split("_")[0] for j in jobs}) == 1 and all("_" in j for j in jobs), jobs  # one array

        def interrupt():
            # Two CPUs: two tasks run; the third starts when the first two are requeued. Each job
            # is interrupted as soon as it has run 3 steps, while more than 30 remain (a job that
            # finished before its signal would not be requeued: CI saw that with 5 of 24 steps).
            _run_at_step({metrics[0]: ["scancel", "--signal=USR1", jobs[0]],  # submitit checkpoints + requeues
                         metrics[1]: ["scontrol", "requeue", jobs[1]]}, 3, timeout_s=120)  # SIGTERM; SLURM requeues
            _run_at_step({metrics[2]: ["scancel", jobs[2]]}, 3, timeout_s=120)  # SIGTERM, gone: no result, no requeue

        errors: list = []
        thread = threading.Thread(target=lambda: _capture(interrupt, errors), daemon=True)
        thread.start()
        rc, text, err = cli(*args, "--launcher", "slurm")  # follows the three jobs while they are interrupted
        thread.join(timeout=10)
        assert not errors, errors
        assert rc == 1, text + err
        assert "0 jobs submitted, 3 followed" in text and "2 requeues survived (2 jobs), 1 jobs lost" in text, text
        lost = result(run, "finetune", cells[2])
        assert lost["status"] == "failed" and lost["recorded_by"] == "launcher", lost
        assert lost["error"].startswith(f"SLURM job {jobs[2]} left the queue without writing a result"), lost
        assert lost["log"] == records(run)[cells[2]]["log"] and Path(lost["log"]).is_file()
        rc, status, _ = cli(*args, "--status")
        assert "failed: SLURM job" in status and "2 done, 1 failed" in status, status
        # Re-launch: only the lost cell goes out again, and resumes from the checkpoint it saved.
        rc, text, err = cli(*args, "--launcher", "slurm", "--no-wait")
        assert rc == 0 and "1 jobs submitted, 0 followed" in text, text + err
        assert records(run)[cells[2]]["job_id"] != jobs[2]
        # The uninterrupted run, here, while the cluster works.
        rc, text, err = cli("sweep", SWEEP, *tiny(tmp_path / "local", cache_dir, steps=steps), *local_args(),
                            "trainer.checkpoint_every=10")
        assert rc == 0, text + err
        rc, text, err = cli(*args, "--launcher", "slurm")
        assert rc == 0 and "0 failed)" in text, text + err
    finally:
        _cancel(run)
    ref = result(tmp_path / "local" / "table1", "finetune", cells[0])
    for c, signal in zip(cells, ("signal=10", "signal=15", "signal=15")):  # USR1, TERM, TERM
        r = result(run, "finetune", c)
        assert r["status"] == "done", r
        assert r["value"] == ref["value"] and r["metrics"]["train_loss"] == ref["metrics"]["train_loss"], (c, r, ref)
        log = Path(r["log"]).read_text() if c != cells[2] else Path(lost["log"]).read_text()
        assert f"finetune.preempted {signal}" in log, log
        resumed = [int(m) for m in re.findall(r"ckpt.resume name=finetune step=(\d+)", Path(r["log"]).read_text())]
        assert resumed and 0 < resumed[0] < steps, (c, resumed)
    assert [result(run, "finetune", c)["slurm_restarts"] for c in cells] == [1, 1, 0]


@pytest.mark.parametrize("override, message", [
    ("launcher.slurm.partition=nope",
     "launcher.slurm.partition: partition 'nope' does not exist on this cluster (partitions: "),
    ("launcher.slurm.pretrain.partition=nope",
     "launcher.slurm.pretrain.partition: partition 'nope' does not exist on this cluster"),
    ("launcher.slurm.finetune.gpus_per_node=64", "launcher.slurm (finetune jobs): launcher.slurm.finetune."
                                                 "gpus_per_node=64: its nodes have at most 0 GPUs (partition "),
    ("datasets.scannet.root=/nonexistent/scannet", "datasets.scannet.root: data directory /nonexistent/scannet "
                                                   "does not exist"),
    ("methods.nosuchmethod={}", "Unknown method 'nosuchmethod'"),
], ids=["partition", "pretrain-partition", "gpus", "data-root", "method"])
def test_bad_input_is_one_error_before_any_submission(tmp_path, cache_dir, plugin, override, message):
    out = tmp_path / "runs"
    rc, text, err = cli("sweep", SWEEP, *tiny(out, cache_dir), *slurm_args(), f"methods.colorization={COLORIZATION}",
                        override, "--launcher", "slurm")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists(), "nothing may be written (or submitted) before the inputs are valid"
