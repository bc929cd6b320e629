"""The one training loop, shared by pre-training and fine-tuning.

A method or task hands the ``Trainer`` a model whose ``forward(batch)`` returns a dict with a
``loss`` tensor (other entries are logged), a ``BatchStream`` and its optimiser/schedule
configs; the trainer owns everything else (as in Pointcept, the trainer only needs a loss):
device placement, autocast, the optimiser step, the schedule, metric logs as JSON lines,
rich progress, resumable checkpoints every N steps and on SIGUSR1/SIGTERM (model, optimiser,
scheduler, step, RNG states and data order), and resumption from the last checkpoint with the
same result as an uninterrupted run (bit-identical on CPU).

Data order is deterministic: ``EpochSampler`` draws global batches from a permutation seeded by
(seed, epoch), and every item's augmentations come from an RNG seeded by (seed, epoch, index),
so a resumed run (or another number of ranks) sees the same samples.

Several processes (``harness.distributed``): the model's BatchNorms become synchronised ones,
DistributedDataParallel averages the gradients, each rank takes its contiguous share of every
global batch (the global batch size must divide by the number of processes), rank 0 alone writes
checkpoints and metric logs (with every rank's RNG state, so all ranks resume from the same
checkpoint where they stopped), and once per step the ranks agree on a non-finite loss and on a
preemption signal, so that no rank waits alone in a collective.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from harness import distributed as dist
from harness.data.cache import atomic_write_text

log = logging.getLogger(__name__)

# SIGUSR2 is what submitit asks SLURM to send before a time limit; USR1 and TERM come from
# users (scancel --signal) and preemption; INT is Ctrl-C (a second one stops at once).
CHECKPOINT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving its checkpoint; the job is to be requeued."""


# ----------------------------------------------------------------------------------------------
# Data order


class EpochSampler:
    """Global batches of dataset indices, reshuffled every epoch from the seed; resumable.

    Each rank takes its contiguous share of the global batch, so ``world_size`` ranks together
    see exactly the batches one process would.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("EpochSampler: the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"EpochSampler: batch_size must be positive, got {batch_size}")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_batch(self) -> List[tuple]:
        """(index, epoch) pairs of the next global batch (wraps into the next epoch)."""
        out: List[tuple] = []
        while len(out) < self.batch_size:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
            order = self._order(self.epoch)
            take = min(self.batch_size - len(out), self.size - self.position)
            out += [(int(i), self.epoch) for i in order[self.position:self.position + take]]
            self.position += take
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The RNG of one item's augmentations: independent of rank, batch and resumption."""
    return np.random.default_rng([seed, epoch, index, 0x5EED])


class BatchStream:
    """Batches from ``make_batch(items, rngs)`` over an ``EpochSampler``; the trainer's data source.

    ``make_batch`` receives this rank's (index, epoch) items and one RNG per item and returns
    a dict (tensors are moved to the device by the trainer).
    """

    def __init__(self, size: int, batch_size: int, seed: int, make_batch: Callable[[List[tuple], List[np.random.Generator]], Dict[str, Any]],
                 shuffle: bool = True):
        self.sampler = EpochSampler(size, batch_size, seed, shuffle)
        self.seed = seed
        self.make_batch = make_batch

    def next(self) -> Dict[str, Any]:
        items = self.sampler.next_batch()
        rank, world = dist.rank(), dist.world_size()
        if world > 1:
            share = math.ceil(len(items) / world)
            items = items[rank * share:(rank + 1) * share]
        rngs = [item_rng(self.seed, epoch, index) for index, epoch in items]
        return self.make_batch(items, rngs)

    def state_dict(self) -> Dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Optimisers and schedules

OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, dampening=c.dampening,
                                             weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}

SCHEDULES: Dict[str, Callable[[Any, int], Callable[[int], float]]] = {
    "constant": lambda c, steps: (lambda s: 1.0),
    "poly": lambda c, steps: (lambda s: max(0.0, 1.0 - s / max(1, steps)) ** c.power),
    "step": lambda c, steps: (lambda s: c.gamma ** (s // max(1, c.step_size))),
    "cosine": lambda c, steps: (lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / max(1, steps)))),
    "multistep": lambda c, steps: (lambda s: c.gamma ** sum(s >= m * steps for m in c.milestones)),
}


def build_optimizer(model: nn.Module, cfg: Any, head_prefixes: Sequence[str] = ()) -> torch.optim.Optimizer:
    """The configured optimiser; parameters under ``head_prefixes`` get ``lr * head_lr_scale``."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {cfg.name!r} is unknown; known: {', '.join(OPTIMIZERS)}")
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if any(name.startswith(h) for h in head_prefixes) else body).append(p)
    groups = [{"params": body, "lr": cfg.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.lr * cfg.head_lr_scale})
    return OPTIMIZERS[cfg.name](groups, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.name not in SCHEDULES:
        raise ValueError(f"schedule.name {cfg.name!r} is unknown; known: {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[cfg.name](cfg, steps))


# ----------------------------------------------------------------------------------------------
# Device and threads


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if name.startswith("cuda") and dist.world_size() > 1 and name == "cuda":
        name = f"cuda:{dist.local_rank()}"
    return torch.device(name)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let float32 matrix products (the sparse convolutions' GEMMs among them) and
    cuDNN convolutions use TF32 tensor cores, or keep them IEEE float32. Process-wide torch
    flags: a job trains one model. Nothing changes off CUDA (no TF32 there)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_state(path: Path, state: Dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a torn file is never read as a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt checkpoint must not be resumed silently
        raise RuntimeError(f"checkpoint {path} cannot be read ({exc}); delete it to restart the job") from exc


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    steps: int
    last: Dict[str, float]
    seconds: float
    resumed_from: int = 0
    evals: List[Dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs ``steps`` optimisation steps of ``model`` on ``batches``, resumably, in ``workdir``."""

    def __init__(self, model: nn.Module, batches: BatchStream, steps: int, optimizer_cfg: Any, schedule_cfg: Any,
                 workdir: Path, device: torch.device, trainer_cfg: Any, name: str = "train",
                 head_prefixes: Sequence[str] = (), evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
                 progress: bool = True):
        if steps <= 0:
            raise ValueError(f"{name}: steps must be positive, got {steps}")
        self.name = name
        self.world = dist.world_size()
        if self.world > 1:
            global_batch = getattr(getattr(batches, "sampler", None), "batch_size", None)
            if global_batch is not None and global_batch % self.world:
                raise ValueError(f"{name}: batch_size {global_batch} (the global batch) does not divide evenly over "
                                 f"the job's {self.world} processes (tasks_per_node x nodes); use a multiple of "
                                 f"{self.world}")
            # BatchNorm statistics of the global batch, as one device holding all of it would compute
            model = dist.convert_sync_batchnorm(model)
        set_tf32(device, bool(getattr(trainer_cfg, "tf32", True)))
        self.model = model.to(device)
        # buffers are not re-broadcast each step: the synchronised BatchNorms keep them equal
        self.module = dist.wrap(self.model, device, bool(getattr(trainer_cfg, "find_unused_parameters", True)),
                                broadcast_buffers=False)
        self.batches = batches
        self.steps = steps
        self.device = device
        self.cfg = trainer_cfg
        self.workdir = Path(workdir)
        self.ckpt_path = self.workdir / "ckpt" / f"{name}-last.pt"
        self.log_path = self.workdir / f"metrics-{name}.jsonl"
        self.optimizer = build_optimizer(self.model, optimizer_cfg, head_prefixes)
        self.scheduler = build_scheduler(self.optimizer, schedule_cfg, steps)
        self.evaluate = evaluate
        self.progress = progress
        self.step = 0
        self._signal: Optional[int] = None
        self._last: Dict[str, float] = {}  # the last step's scalars (in the checkpoint: a run resumed at its end keeps them)

    # -- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data": self.batches.state_dict(),
            "rng": _rng_state(),
            "last": dict(self._last),
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint (with every rank's RNG state: the ranks draw different
        samples in their losses); the others wait until it is on disk."""
        rng_ranks = dist.gather_objects(_rng_state()) if self.world > 1 else None
        if dist.is_main():
            state = self.state_dict()
            if rng_ranks is not None:
                state["rng_ranks"] = rng_ranks
            save_state(self.ckpt_path, state)
            log.info("ckpt.save name=%s step=%d file=%s", self.name, self.step, self.ckpt_path)
        dist.barrier()

    def _resume(self) -> int:
        state = load_state(self.ckpt_path)
        if state is None:
            self._truncate_log(0)  # a run killed before its first checkpoint starts over: so does its log
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        ranks = state.get("rng_ranks")
        if self.world > 1 and ranks is not None and len(ranks) == self.world:
            _set_rng_state(ranks[dist.rank()])
        else:
            if self.world > 1 or ranks is not None:
                log.warning("ckpt.rng_layout name=%s saved_ranks=%s world=%d: every rank resumes with rank 0's RNG "
                            "state (random draws in losses differ from an uninterrupted run)", self.name,
                            len(ranks) if ranks is not None else 1, self.world)
            _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._last = {k: float(v) for k, v in (state.get("last") or {}).items()}
        self._truncate_log(self.step)
        log.info("ckpt.resume name=%s step=%d file=%s", self.name, self.step, self.ckpt_path)
        return self.step

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone), and
        any line that is not a record (a process killed while writing it)."""
        if not dist.is_main() or not self.log_path.is_file():
            return
        from harness.store import read_jsonl

        records, torn = read_jsonl(self.log_path)
        if torn:
            log.warning("train.log_lines_dropped file=%s lines=%d: not JSON records (cut off when a process died)",
                        self.log_path, torn)
        atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))

    def _log(self, record: Dict[str, Any]) -> None:
        if dist.is_main():
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # -- signals --------------------------------------------------------------------------------
    def _install_signals(self) -> Dict[int, Any]:
        previous = {}
        for sig in CHECKPOINT_SIGNALS:
            try:
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # a process told to ignore Ctrl-C (nohup, a background job) keeps ignoring it
                previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no signal handling
                pass
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the step's checkpoint
        self._signal = signum  # acted upon at the end of the current step

    def _restore_signals(self, previous: Dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    # -- loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.workdir.mkdir(parents=True, exist_ok=True)
        resumed = self._resume()
        previous = self._install_signals()
        start = time.time()
        evals: List[Dict[str, Any]] = []
        bad = 0
        autocast = _autocast(self.device, bool(self.cfg.amp))
        try:
            with _progress(self.progress and dist.is_main(), self.name, self.steps, resumed) as advance:
                while self.step < self.steps:
                    self.model.train()
                    batch = to_device(self.batches.next(), self.device)
                    with autocast():
                        out = self.module(batch)
                    loss = out["loss"]
                    finite = bool(torch.isfinite(loss))
                    signum = self._signal
                    if self.world > 1:
                        # One agreement per step: every rank skips a step that is non-finite on any
                        # rank (DDP needs all or none in backward) and stops on a signal any rank got.
                        any_bad, any_signal = dist.any_rank([int(not finite), int(self._signal or 0)])
                        finite, signum = not any_bad, (any_signal or None)
                    if not finite:
                        bad += 1
                        if bad >= self.cfg.max_bad_steps:
                            where = "" if not torch.isfinite(loss) or self.world == 1 else " on another rank"
                            value = loss.item() if not torch.isfinite(loss) else "non-finite"
                            raise FloatingPointError(f"{self.name}: loss is {value}{where} for {bad} steps in a row "
                                                     f"at step {self.step}; lower the learning rate")
                        self.optimizer.zero_grad(set_to_none=True)
                    else:
                        bad = 0
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        self.optimizer.step()
                    self.scheduler.step()
                    self.step += 1
                    last = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()
                            if (torch.is_tensor(v) and v.numel() == 1) or isinstance(v, (int, float))}
                    self._last = last
                    if self.step % self.cfg.log_every == 0 or self.step == self.steps:
                        if self.world > 1:
                            last = dist.mean_scalars(last)  # the global batch's values (every rank)
                        self._last = last
                        record = {"step": self.step, "total": self.steps, **last,
                                  "lr": self.optimizer.param_groups[0]["lr"], "time": round(time.time() - start, 3)}
                        self._log(record)
                        log.info("%s.step %s", self.name, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                                   for k, v in record.items()))
                    if self.evaluate and self.cfg.eval_every and self.step % self.cfg.eval_every == 0 \
                            and self.step < self.steps:
                        evals.append(self._run_eval())
                    advance(self.step, self._last.get("loss", float("nan")))
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 \
                            and self.step < self.steps:
                        self.save_checkpoint()
                    if self.world == 1:
                        signum = self._signal  # one process: whatever arrived during this step
                    if signum is not None:
                        self._preempt(previous, signum)
        finally:
            self._restore_signals(previous)
        self.save_checkpoint()
        return TrainResult(self.step, dict(self._last), time.time() - start, resumed, evals)

    def _run_eval(self) -> Dict[str, Any]:
        assert self.evaluate is not None
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model)
        record = {"step": self.step, "split": "val", **{k: float(v) for k, v in metrics.items()}}
        self._log(record)
        return record

    def _preempt(self, previous: Dict[int, Any], signum: int) -> None:
        self.save_checkpoint()
        log.warning("%s.%s signal=%s step=%d checkpoint=%s", self.name,
                    "interrupted" if signum == signal.SIGINT else "preempted", signum, self.step, self.ckpt_path)
        self._restore_signals(previous)
        handler = previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, None)  # e.g. submitit's: on rank 0 it requeues the job and exits
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(f"{self.name}: interrupted at step {self.step}; checkpoint saved, the next "
                                    "launch resumes from it")
        if self.world > 1:
            # The other ranks leave after rank 0 has requeued the job: this barrier ends when rank 0
            # exits (a connection error) or, when its handler returned, when every rank is here.
            try:
                dist.barrier()
            except RuntimeError as exc:
                log.info("%s.preempted rank=%d: rank 0 has left (%s)", self.name, dist.rank(),
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise Preempted(f"{self.name}: stopped by signal {signum} at step {self.step}; checkpoint saved")


def _autocast(device: torch.device, enabled: bool) -> Callable[[], Any]:
    if not enabled:
        import contextlib

        return contextlib.nullcontext
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class _progress:
    """A rich progress bar when wanted (and a no-op otherwise)."""

    def __init__(self, enabled: bool, name: str, total: int, done: int):
        self.enabled, self.name, self.total, self.done = enabled, name, total, done

    def __enter__(self) -> Callable[[int, float], None]:
        if not self.enabled:
            return lambda step, loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True)
        self._p.__enter__()
        task = self._p.add_task(self.name, total=self.total, completed=self.done, loss=float("nan"))
        return lambda step, loss: self._p.update(task, completed=step, loss=loss)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._p.__exit__(*exc)
