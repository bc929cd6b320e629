"""The shared training loop: deterministic data order, schedules, resumption, signals."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from harness.config import OptimizerConfig, ScheduleConfig, TrainerConfig
from harness.train import SCHEDULES, BatchStream, EpochSampler, Preempted, Trainer


def test_epoch_sampler_order_and_resume():
    s = EpochSampler(5, 2, seed=3)
    first = [s.next_batch() for _ in range(6)]  # 12 items: epochs 0, 1 and 2 partly
    flat = [i for b in first for i in b]
    assert [e for _, e in flat] == [0] * 5 + [1] * 5 + [2] * 2
    assert sorted(i for i, e in flat if e == 0) == [0, 1, 2, 3, 4]
    assert [i for i, e in flat if e == 0] == np.random.default_rng([3, 0]).permutation(5).tolist()
    s2 = EpochSampler(5, 2, seed=3)
    for _ in range(3):
        s2.next_batch()
    state = s2.state_dict()
    s3 = EpochSampler(5, 2, seed=3)
    s3.load_state_dict(state)
    assert [s3.next_batch() for _ in range(3)] == first[3:]


def test_schedules_by_hand():
    c = OmegaConf.structured(ScheduleConfig(power=0.9, gamma=0.5, step_size=10, milestones=[0.5, 0.75]))
    assert SCHEDULES["poly"](c, 100)(50) == pytest.approx(0.5 ** 0.9)
    assert SCHEDULES["step"](c, 100)(25) == pytest.approx(0.25)
    assert SCHEDULES["cosine"](c, 100)(50) == pytest.approx(0.5)
    assert SCHEDULES["multistep"](c, 100)(49) == 1.0
    assert SCHEDULES["multistep"](c, 100)(80) == pytest.approx(0.25)


class Regression(nn.Module):
    """Least squares on a fixed random problem; its batches come from the item RNGs."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, batch):
        pred = self.backbone(batch["x"]).squeeze(1)
        return {"loss": ((pred - batch["y"]) ** 2).mean()}


def make_stream(seed=0):
    w = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)

    def make_batch(items, rngs):
        x = np.stack([r.normal(size=4).astype(np.float32) for r in rngs])
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(x @ w)}

    return BatchStream(16, 4, seed, make_batch)


def make_trainer(tmp_path, steps=12, every=3, stream=None):
    torch.manual_seed(0)
    cfg = OmegaConf.structured(TrainerConfig(checkpoint_every=every, log_every=1))
    opt = OmegaConf.structured(OptimizerConfig(lr=0.05, momentum=0.9))
    return Trainer(Regression(), stream or make_stream(), steps, opt, OmegaConf.structured(ScheduleConfig()),
                   tmp_path, torch.device("cpu"), cfg, progress=False)


def test_loss_falls(tmp_path):
    t = make_trainer(tmp_path, steps=60, every=0)
    t.fit()
    log = [json.loads(line) for line in (tmp_path / "metrics-train.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 60 and log[-1]["loss"] < 0.5 * log[0]["loss"]


def test_signal_then_resume_is_bit_identical(tmp_path):
    ref = make_trainer(tmp_path / "ref")
    ref.fit()

    stream = make_stream()
    inner = stream.make_batch
    calls = {"n": 0}

    def make_batch(items, rngs):
        calls["n"] += 1
        if calls["n"] == 5:  # a preemption signal arrives during step 5
            os.kill(os.getpid(), signal.SIGUSR1)
        return inner(items, rngs)

    stream.make_batch = make_batch
    first = make_trainer(tmp_path / "run", stream=stream)
    with pytest.raises(Preempted):
        first.fit()
    assert first.step == 5  # stopped at the end of the step in which the signal came
    resumed = make_trainer(tmp_path / "run")
    result = resumed.fit()
    assert result.resumed_from == 5
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    # the metric log has each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics-train.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_torn_checkpoint_is_not_resumed_silently(tmp_path):
    t = make_trainer(tmp_path, steps=3, every=1)
    t.fit()
    t.ckpt_path.write_bytes(t.ckpt_path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="cannot be read"):
        make_trainer(tmp_path, steps=6).fit()


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    def make_batch(items, rngs):
        return {"x": torch.full((4, 4), float("nan")), "y": torch.zeros(4)}

    t = make_trainer(tmp_path, stream=BatchStream(4, 4, 0, make_batch))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        t.fit()


@pytest.mark.parametrize("enabled", [False, True])
def test_tf32_setting_applies_on_cuda_only(enabled):
    """``trainer.tf32`` sets torch's TF32 flags for a CUDA device (both: matrix products,
    which the sparse convolutions are, and cuDNN convolutions) and leaves them alone elsewhere."""
    from harness.train import set_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not enabled
        set_tf32(torch.device("cpu"), enabled)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (not enabled, not enabled)
        set_tf32(torch.device("cuda"), enabled)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert OmegaConf.structured(TrainerConfig).tf32 is True


def _signal_at(call: int, sig: int):
    """A stream whose ``call``-th batch sends ``sig`` to this process (the signal arrives mid-step)."""
    stream = make_stream()
    inner, calls = stream.make_batch, {"n": 0}

    def make_batch(items, rngs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), sig)
        return inner(items, rngs)

    stream.make_batch = make_batch
    return stream


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.fixture
def sigint_handler(request):
    """SIGINT handled as ``request.param`` says for the test (a terminal: Python's own Ctrl-C
    handler; nohup or a background job: ignored), whatever the test process started with."""
    previous = signal.signal(signal.SIGINT, request.param)
    yield request.param
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sigint_handler", [signal.default_int_handler], indirect=True)
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path, sigint_handler):
    ref = make_trainer(tmp_path / "ref", every=100)
    ref_result = ref.fit()
    first = make_trainer(tmp_path / "run", every=100, stream=_signal_at(5, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 5; checkpoint saved"):
        first.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    resumed = make_trainer(tmp_path / "run", every=100)
    result = resumed.fit()
    assert result.resumed_from == 5 and result.last == ref_result.last
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert _steps(tmp_path / "run" / "metrics-train.jsonl") == list(range(1, 13))


def test_a_run_restarted_from_step_0_or_over_a_torn_log_line_keeps_one_line_per_step(tmp_path):
    """Killed before its first checkpoint, a run starts over: the dead attempt's lines go. A
    line cut off by a kill is dropped when resuming (it used to stop the resume for good)."""
    log_path = tmp_path / "metrics-train.jsonl"
    log_path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    make_trainer(tmp_path, steps=6, every=3).fit()
    assert _steps(log_path) == [1, 2, 3, 4, 5, 6]
    with open(log_path, "a") as fh:
        fh.write('{"step": 7, "lo')
    result = make_trainer(tmp_path, steps=9, every=3).fit()
    assert result.resumed_from == 6 and _steps(log_path) == list(range(1, 10))


def test_a_run_resumed_at_its_last_step_keeps_its_training_summary(tmp_path):
    """The final checkpoint holds the last step's scalars: a job killed between it and its
    result (during evaluation) reports the same training loss when rerun."""
    done = make_trainer(tmp_path, steps=6, every=3).fit()
    again = make_trainer(tmp_path, steps=6, every=3).fit()
    assert again.resumed_from == 6 and again.last == done.last and "loss" in done.last


@pytest.mark.parametrize("sigint_handler", [signal.SIG_IGN], indirect=True)
def test_a_process_that_ignores_ctrl_c_trains_on(tmp_path, sigint_handler):
    result = make_trainer(tmp_path, every=100, stream=_signal_at(5, signal.SIGINT)).fit()
    assert result.steps == 12 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
