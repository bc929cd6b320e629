"""The local launcher's GPUs: which ones a machine offers, how many each job gets, how parallel
jobs spread over them, and the errors that name the keys before anything runs. No GPU is needed:
the machine's GPUs are simulated where a test needs them."""

from __future__ import annotations

import pytest

from harness import launchers
from harness.config import ConfigError
from harness.launchers import GpuPool, LocalLauncher, local_gpus, visible_gpu_indices
from tests._sweeps import SWEEP, cli, tiny


def test_gpu_pool_spreads_jobs_and_shares_only_when_needed():
    pool = GpuPool([0, 1, 2], per_job=1)
    assert [pool.take(), pool.take(), pool.take()] == [[0], [1], [2]]
    assert pool.take() == [0]  # every GPU busy once: the lowest index takes a second job
    pool.give([1])
    assert pool.take() == [1]  # the one GPU that became free
    pairs = GpuPool([4, 6, 7], per_job=2)
    assert pairs.take() == [4, 6]
    assert pairs.take() == [4, 7]  # 7 is free, 4 and 6 tie and 4 comes first
    pairs.give([4, 6])
    assert pairs.take() == [4, 6]


@pytest.mark.parametrize("env, expected", [(None, [0, 1, 2]), ("2,3", [2, 3]), ("", []), ("1,-1,3", [1]),
                                          (" 0 , 5 ", [0, 5])])
def test_visible_gpus_follow_cuda_visible_devices(env, expected):
    assert visible_gpu_indices(env, count=3) == expected


def test_gpus_named_by_uuid_are_a_clear_error():
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='GPU-8a1b2c3d'.*by index"):
        visible_gpu_indices("GPU-8a1b2c3d", count=1)


def test_a_machine_without_cuda_hands_out_no_gpu_whatever_the_variable_says(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert local_gpus() == []


@pytest.mark.parametrize("explicit, tasks, gpus, device, expected", [
    (None, 1, [0], "auto", 1),     # a GPU machine: device auto runs there, one GPU per job
    (None, 2, [0, 1], "cuda", 2),  # one per process
    (None, 1, [0], "cpu", 0),      # the sweep asked for the CPU
    (None, 1, [], "auto", 0),      # no GPU here
    (0, 1, [0], "auto", 0),        # the user's own setting wins
    (3, 1, [0, 1, 2], "auto", 3),
])
def test_gpus_per_job(monkeypatch, explicit, tasks, gpus, device, expected):
    monkeypatch.setattr(launchers, "local_gpus", lambda: gpus)
    cfg = {"gpus_per_node": explicit, "tasks_per_node": tasks, "executor": "local"}
    assert LocalLauncher(cfg).gpus_per_job(device) == expected


@pytest.mark.parametrize("gpus, overrides, message", [
    ([], ["device=cuda"], "device: cuda, but this machine has no GPU that torch can use"),
    ([0], ["device=cuda", "launcher.local.gpus_per_node=0"],
     "launcher.local.tasks_per_node=1 needs one GPU per process, but launcher.local.gpus_per_node=0"),
    ([0], ["launcher.local.gpus_per_node=2"], "launcher.local.gpus_per_node=2, but this machine has 1 GPU"),
    ([0], ["launcher.local.executor=slurm"], "launcher.local.executor is 'slurm'; it must be local or debug"),
])
def test_gpu_settings_that_cannot_work_stop_the_sweep_before_it_runs(monkeypatch, tmp_path, gpus, overrides,
                                                                     message):
    monkeypatch.setattr(launchers, "local_gpus", lambda: gpus)
    rc, text, err = cli("sweep", SWEEP, *tiny(tmp_path / "runs", tmp_path / "cache"), *overrides, "--dry-run")
    assert rc != 0 and message in text + err, text + err
    assert not (tmp_path / "runs").exists()


class _Recording:
    """submitit's LocalExecutor as the launcher drives it, running each job in this process and
    recording the GPUs it was handed."""

    handed: list = []

    def __init__(self, folder):
        self.params = {}

    def update_parameters(self, **kwargs):
        self.params.update(kwargs)

    def submit(self, fn, *args):
        self.handed.append((self.params["gpus_per_node"], self.params["visible_gpus"]))
        return launchers._InProcessExecutor().submit(fn, *args)


def test_parallel_jobs_are_handed_different_gpus(monkeypatch, tmp_path, cache_dir, small_scannet):
    """Two seeds' jobs at once on a simulated 2-GPU machine: the first gets GPU 0, the second GPU
    1 (submitit turns these into each job's CUDA_VISIBLE_DEVICES). Without CUDA here, device auto
    still runs the jobs on the CPU, and both finish."""
    monkeypatch.setattr(launchers, "local_gpus", lambda: [0, 1])
    monkeypatch.setattr(launchers.submitit, "LocalExecutor", _Recording)
    _Recording.handed = []
    rc, text, err = cli("sweep", SWEEP, *tiny(tmp_path / "runs", cache_dir), "seeds=[0,1]",
                        "launcher.local.parallel=2", "launcher.local.cpus=2")
    assert rc == 0, text + err
    assert _Recording.handed == [(1, (0,)), (1, (1,))], _Recording.handed
