"""SLURM launcher pieces that need no cluster: per-stage resources, the sbatch options they
become, how a plan is cut into submissions, GPU-hours, and the job-side rules that make
re-launching and requeueing safe (stale checkpoints, archived results, done jobs not re-run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.config import LauncherConfig
from harness.launchers import (SlurmLauncher, executor_parameters, gpu_hours, sbatch_flags, stage_resources,
                               submissions)
from harness.store import Store
from harness.sweep import FINETUNE, PRETRAIN, JobSpec, Plan


def slurm_cfg(**over):
    cfg = OmegaConf.structured(LauncherConfig).slurm
    return OmegaConf.merge(cfg, over)


def test_stage_overrides_apply_field_by_field():
    cfg = slurm_cfg(partition="gpu", account="proj", gpus_per_node=1, cpus_per_task=8, mem_gb=32, timeout_min=60,
                    additional_parameters={"mail-type": "END", "exclude": "n1"},
                    pretrain={"gpus_per_node": 4, "timeout_min": 2880, "qos": "long",
                              "additional_parameters": {"exclude": "n2"}})
    pre = stage_resources(cfg, PRETRAIN)
    fine = stage_resources(cfg, FINETUNE)
    assert {k: pre[k] for k in ("partition", "account", "qos", "gpus_per_node", "cpus_per_task", "timeout_min")} == \
        {"partition": "gpu", "account": "proj", "qos": "long", "gpus_per_node": 4, "cpus_per_task": 8,
         "timeout_min": 2880}
    assert pre["additional_parameters"] == {"mail-type": "END", "exclude": "n2"}
    assert pre["source"]["gpus_per_node"] == "launcher.slurm.pretrain.gpus_per_node"
    assert pre["source"]["partition"] == "launcher.slurm.partition"
    assert (fine["gpus_per_node"], fine["timeout_min"], fine["qos"]) == (1, 60, None)
    assert fine["additional_parameters"] == {"mail-type": "END", "exclude": "n1"}

    assert sbatch_flags(pre) == ["--time=2880", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=8",
                                 "--partition=gpu", "--account=proj", "--qos=long", "--gpus-per-node=4",
                                 "--mem=32GB", "--mail-type=END", "--exclude=n2"]
    params = executor_parameters(pre, cfg, "table1/pre:csc__s0")
    assert {k: params[k] for k in ("time", "gpus_per_node", "mem", "partition", "qos", "job_name", "signal_delay_s")} \
        == {"time": 2880, "gpus_per_node": 4, "mem": "32GB", "partition": "gpu", "qos": "long",
            "job_name": "table1/pre:csc__s0", "signal_delay_s": 90}
    assert "constraint" not in params  # null: not passed to sbatch
    repo = Path(__file__).resolve().parent.parent
    assert params["setup"][0].startswith(f"export PYTHONPATH={repo}")
    # 1 node x 4 GPUs x 48 h
    assert gpu_hours(pre) == 192.0


def test_no_gpus_and_site_default_memory_are_left_out():
    res = stage_resources(slurm_cfg(gpus_per_node=0, mem_gb=0, cpus_per_task=1, timeout_min=30), FINETUNE)
    flags = sbatch_flags(res)
    assert not any(f.startswith(("--gpus", "--mem")) for f in flags), flags
    assert gpu_hours(res) == 0.0


def _spec(kind, jid, method, run, pre=None, inline=False, h="h", device="cpu"):
    return JobSpec(kind, jid, method, 0, str(run), {}, {}, {}, device, "scannet", {}, column="c" if kind == FINETUNE
                   else None, task="semseg" if kind == FINETUNE else None, pretrain_id=pre, pretrain_hash="p" + pre
                   if pre else None, config_hash=h, inline_pretrain=inline)


@pytest.fixture
def plan_and_store(tmp_path):
    """A: pre-trained already (in the store), B: to pre-train, S: Scratch (inline); 2 columns."""
    run = tmp_path / "run"
    store = Store(run)
    pre_a = _spec(PRETRAIN, "A__s0", "A", run, h="pA__s0")
    pre_b = _spec(PRETRAIN, "B__s0", "B", run, h="pB__s0")
    store.write(PRETRAIN, "A__s0", {"status": "done", "config_hash": "pA__s0"})
    fine = [_spec(FINETUNE, f"{m}__{c}__s0", m, run, pre=f"{m}__s0", inline=m == "S") for m in "ABS" for c in "xy"]
    plan = Plan("t", run, pretrain=[pre_a, pre_b], finetune=fine, methods=["A", "B", "S"])
    return plan, store


def test_plan_cut_into_jobs_and_arrays(plan_and_store):
    plan, store = plan_and_store
    todo = [j for j in plan.jobs if j.id != "A__s0"]
    subs = submissions(plan, todo, store)
    got = [(s.name, s.stage, [j.id for j in s.specs], s.after) for s in subs]
    assert got == [
        ("pre:B__s0", PRETRAIN, ["B__s0"], None),
        # A's checkpoint is ready and Scratch makes its own: one array without dependency
        ("ft", FINETUNE, ["A__x__s0", "A__y__s0", "S__x__s0", "S__y__s0"], None),
        ("ft:B__s0", FINETUNE, ["B__x__s0", "B__y__s0"], "B__s0"),
    ]


def test_dry_run_rows_and_gpu_hours(plan_and_store):
    plan, store = plan_and_store
    cfg = slurm_cfg(gpus_per_node=1, timeout_min=90, array_parallelism=3,
                    pretrain={"gpus_per_node": 8, "nodes": 2, "timeout_min": 120})
    rows, lines = SlurmLauncher(cfg).describe(plan, store)
    assert "A__s0" not in rows  # done: nothing to submit
    assert rows["B__x__s0"]["waits for"] == "afterok B__s0"
    assert rows["S__x__s0"]["waits for"] == "inline pre-training"
    assert rows["A__x__s0"]["submit as"] == "array ft [4, 3 at once]"
    assert rows["B__s0"]["resources"].startswith("2x8 GPU")
    # pre-training: 2 nodes x 8 GPUs x 2 h = 32; fine-tuning: 6 cells x 1 GPU x 1.5 h = 9
    assert lines[1] == "GPU-hours at the time limits: 41.0 (pre-training 32.0, fine-tuning 9.0)"
    assert lines[0].startswith("7 jobs to submit in 3 sbatch calls")


def test_claim_workdir_drops_state_of_another_config(tmp_path):
    from harness.launch import claim_workdir

    wd = tmp_path / "cell"
    (wd / "ckpt").mkdir(parents=True)
    (wd / "ckpt" / "finetune-last.pt").write_bytes(b"old")
    (wd / "metrics-finetune.jsonl").write_text('{"step": 1}\n')
    claim_workdir(wd, "h1")  # no marker: state of unknown origin is not resumed
    assert not (wd / "ckpt").exists() and not (wd / "metrics-finetune.jsonl").exists()
    (wd / "ckpt").mkdir()
    (wd / "ckpt" / "finetune-last.pt").write_bytes(b"mine")
    claim_workdir(wd, "h1")  # same config (requeue): kept
    assert (wd / "ckpt" / "finetune-last.pt").read_bytes() == b"mine"
    claim_workdir(wd, "h2")  # config changed: dropped
    assert not (wd / "ckpt").exists() and (wd / "config_hash").read_text().strip() == "h2"


def test_archive_moves_an_old_result_aside(tmp_path):
    store = Store(tmp_path)
    store.write(FINETUNE, "m__c__s0", {"status": "failed", "error": "boom", "config_hash": "h"})
    dest = store.archive(FINETUNE, "m__c__s0")
    assert store.read(FINETUNE, "m__c__s0") is None
    assert dest.parent == tmp_path / "cells" / "m__c__s0" / "attempts" and '"boom"' in dest.read_text()
    assert store.archive(FINETUNE, "m__c__s0") is None


def test_a_requeued_job_that_already_finished_returns_its_result(tmp_path):
    """SLURM may requeue a job that wrote its result (scontrol requeue within KillWait): it must
    not train again. The spec points at a data root that does not exist, so running would fail."""
    from harness.launch import Job

    spec = _spec(FINETUNE, "m__c__s0", "scratch", tmp_path, pre="m__s0", h="hh")
    spec.dataset_cfg = {"root": str(tmp_path / "missing")}
    stored = {"status": "done", "config_hash": "hh", "value": 0.5}
    Store(tmp_path).write(FINETUNE, spec.id, stored)
    assert Job()(spec) == stored


@pytest.mark.parametrize("device, over, message", [
    ("cuda", {"gpus_per_node": 0}, "device: cuda, but launcher.slurm.gpus_per_node=0 leaves some of the 1 processes"),
    ("cuda", {"gpus_per_node": 1, "finetune": {"tasks_per_node": 2}},
     "launcher.slurm.gpus_per_node=1 leaves some of the 2 processes per node (launcher.slurm.finetune.tasks_per_node)"),
    ("cuda", {"gpus_per_node": 2, "tasks_per_node": 2}, None),
    ("auto", {"gpus_per_node": 0}, None),  # auto runs on the CPU where the job has no GPU
])
def test_cuda_jobs_need_a_gpu_per_process(tmp_path, device, over, message):
    from harness.config import ConfigError

    run = tmp_path / "run"
    plan = Plan("t", run, pretrain=[_spec(PRETRAIN, "B__s0", "B", run, device=device)],
                finetune=[_spec(FINETUNE, "B__x__s0", "B", run, pre="B__s0", device=device)], methods=["B"])
    launcher = SlurmLauncher(slurm_cfg(**over))
    if message is None:
        launcher.validate_gpus(plan, "sweep.yaml")
    else:
        with pytest.raises(ConfigError) as err:
            launcher.validate_gpus(plan, "sweep.yaml")
        assert message in str(err.value), str(err.value)


def test_resources_no_node_can_give_are_named_by_their_keys():
    from harness.launchers import _gres_gpus, unmet_resources

    assert _gres_gpus("gpu:a100:4(S:0-1)") == 4 and _gres_gpus("gpu:8,shard:2") == 8 and _gres_gpus("(null)") == 0
    nodes = [(64, 512000, "gpu:a100:4(S:0-1)", "a100,ib"), (32, 256000, "(null)", "cpu")]
    source = {k: f"launcher.slurm.{k}" for k in ("cpus_per_task", "tasks_per_node", "mem_gb", "nodes",
                                                 "gpus_per_node", "constraint")}
    fits = {"cpus_per_task": 16, "tasks_per_node": 4, "mem_gb": 500, "nodes": 2, "gpus_per_node": 4,
            "constraint": "a100", "source": source}
    assert unmet_resources(fits, nodes) == []
    unmet = unmet_resources({**fits, "cpus_per_task": 17, "mem_gb": 600, "nodes": 3, "gpus_per_node": 8,
                             "constraint": "h100&ib", "source": {**source, "mem_gb": "launcher.slurm.pretrain.mem_gb"}},
                            nodes)
    assert unmet == ["launcher.slurm.cpus_per_task=17 x launcher.slurm.tasks_per_node=4: 68 CPUs per node, "
                     "its nodes have at most 64",
                     "launcher.slurm.pretrain.mem_gb=600: its nodes have at most 500.0 GB",
                     "launcher.slurm.nodes=3: it has 2 nodes",
                     "launcher.slurm.gpus_per_node=8: its nodes have at most 4 GPUs",
                     "launcher.slurm.constraint=h100&ib: its nodes' features are a100, cpu, ib"]
    assert unmet_resources(fits, []) == []  # sinfo did not answer: nothing to say
