"""Benchmark: where a CPU training step of the torch backend spends its time, and the floor that sets.

    python -m bench.cpu_floor [--voxels 100000] [--threads 2] [--repeats 3] [--no-minkowski]
                              [--out reports/bench/cpu-floor.md] [--input rooms|scannet] [--scannet-root DIR]

Why: the backbone benchmark gives the ratio to MinkowskiEngine; this says how far the torch
backend's step is from the fastest it could be on these cores, and why. On one input, in one
process:

1. One thread (every task runs on the calling thread): the step's time by kind of work, from
   the torch profiler (inclusive time of top-level aten ops; the kernel maps timed as a whole),
   scaled to the unprofiled step; the GEMMs' GFLOP/s (executed multiplications, padding
   included) against the one-thread matmul peak.
2. One thread and ``threads`` threads: wall and CPU seconds (all threads of the process)
   inside the worker pool's runs (the convolutions) and outside them (batch norm, ReLU,
   scatter-adds, the maps, Python), steps alternated.

Two floors follow: the ``threads``-thread step's CPU seconds / ``threads`` (no core ever
idle), and the one-thread step / ``threads`` (no core idle, and no work added by running side
by side: shared caches, memory bandwidth and power, thread hand-offs). With MinkowskiEngine
installed its steps, alternated with the others, give the ratio measured and at each floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Tuple
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import emit  # noqa: E402
from bench.backbone import add_input_options, use_input  # noqa: E402
from bench.launches import GEMMS, VIEWS, top_level_ops  # noqa: E402

MAPS = "kernel maps"
NUMPY_GEMM = "numpy GEMM"  # a product through numpy's BLAS (harness.backbones.gemm), no aten op of its own
KINDS: Tuple[Tuple[str, frozenset], ...] = (
    ("GEMMs", frozenset(GEMMS) | {NUMPY_GEMM}),
    ("gathers", frozenset({"aten::index_select", "aten::index_fill_"})),
    ("scatter-adds and row writes", frozenset({"aten::index_add_", "aten::scatter_add_", "aten::index_copy_"})),
    ("batch norm", frozenset({"aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::batch_norm"})),
    ("ReLU", frozenset({"aten::relu_", "aten::clamp_min_", "aten::threshold_backward", "aten::relu"})),
    ("views (dispatch only)", frozenset(VIEWS)),
)


@contextmanager
def maps_marked():
    """Runs the torch backend's input wrapping (where every kernel map is built) inside a
    profiler range named ``MAPS``."""
    from torch.profiler import record_function

    from harness.backbones.torch_backend import TorchOps

    wrap = TorchOps.wrap

    def marked(*args, **kwargs):
        with record_function(MAPS):
            return wrap(*args, **kwargs)

    with mock.patch.object(TorchOps, "wrap", staticmethod(marked)):
        yield


@contextmanager
def numpy_gemms_marked():
    """Runs each product the backend hands to numpy's BLAS inside a profiler range named
    ``NUMPY_GEMM`` (the profiler sees aten ops only)."""
    from torch.profiler import record_function

    from harness.backbones import gemm

    numpy_mm = gemm._numpy_mm

    def marked(*args, **kwargs):
        with record_function(NUMPY_GEMM):
            return numpy_mm(*args, **kwargs)

    with mock.patch.object(gemm, "_numpy_mm", marked):
        yield


def work_by_kind(model, coords, feats) -> Tuple[Dict[str, float], float]:
    """Seconds per kind of work in one profiled step (one thread), and the profiled step's
    wall seconds. ``other ops`` are the remaining aten ops; ``Python and dispatch`` is what no
    top-level op accounts for."""
    from torch.profiler import ProfilerActivity, profile

    from bench.backbone import _step

    with maps_marked(), numpy_gemms_marked():
        _step(model, coords, feats, "cpu")
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = _step(model, coords, feats, "cpu")
    secs: Dict[str, float] = {name: 0.0 for name, _ in KINDS}
    secs.update({MAPS: 0.0, "other ops": 0.0})
    for evt in top_level_ops(prof.events(), marks=(MAPS, NUMPY_GEMM)):
        kind = MAPS if evt.name == MAPS else next((name for name, ops in KINDS if evt.name in ops), "other ops")
        secs[kind] += evt.cpu_time_total / 1e6
    secs["Python and dispatch"] = max(0.0, wall - sum(secs.values()))
    return secs, wall


FIRST_GAP = "step start to the first pool run (input, all kernel maps, stem)"
LAST_GAP = "after the last pool run (loss, last gradients)"


def _pool_op(frame) -> str:
    """The public op of harness.backbones.ops that started a pool run (the first caller up
    the stack whose name does not start with an underscore)."""
    while frame is not None and frame.f_code.co_name.startswith("_"):
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "?"


def split_step(model, coords, feats) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    """One step: its wall and CPU seconds (all threads of the process), those spent inside
    the worker pool's runs (outermost runs only), and the stretches between runs, by the op
    that started the next run: label -> [wall, CPU, count]."""
    from bench.backbone import _step
    from harness.backbones import ops

    run = ops.run_tasks
    inside = [0.0, 0.0]
    depth = [0]
    last: List[float] = []  # wall and CPU clock at the end of the last outermost run (or the step's start)
    gaps: Dict[str, List[float]] = {}

    def add_gap(label: str, t: float, c: float) -> None:
        g = gaps.setdefault(label, [0.0, 0.0, 0])
        g[0] += t - last[0]
        g[1] += c - last[1]
        g[2] += 1

    def timed(*args, **kwargs):
        depth[0] += 1
        t0, c0 = time.perf_counter(), time.process_time()
        if depth[0] == 1:
            add_gap(FIRST_GAP if not gaps else "before " + _pool_op(sys._getframe(1)), t0, c0)
        try:
            return run(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                t1, c1 = time.perf_counter(), time.process_time()
                inside[0] += t1 - t0
                inside[1] += c1 - c0
                last[:] = [t1, c1]

    model.zero_grad(set_to_none=True)
    with mock.patch.object(ops, "run_tasks", timed):
        c0 = time.process_time()
        last[:] = [time.perf_counter(), c0]
        wall = _step(model, coords, feats, "cpu")
        cpu = time.process_time() - c0
    add_gap(LAST_GAP, time.perf_counter(), time.process_time())
    return {"wall": wall, "pool_wall": inside[0], "pool_cpu": inside[1], "cpu": cpu}, gaps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voxels", type=int, default=100000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-minkowski", action="store_true", help="skip the MinkowskiEngine steps")
    p.add_argument("--out", default=None, help="also write the report as markdown here")
    add_input_options(p)
    args = p.parse_args(argv)
    use_input(p, args)

    import harness  # noqa: F401  (before torch: thread settings)
    import torch

    from bench.backbone import _build, _step, count_flops, input_args, input_description, make_input, matmul_peak
    from harness.backbones import available_backends, gemm
    from harness.provenance import git_commit

    coords, feats = make_input(args.voxels)
    flops = count_flops(coords, feats)
    model = _build("torch", "cpu")

    torch.set_num_threads(1)
    kinds, profiled = work_by_kind(model, coords, feats)
    peak1 = matmul_peak()
    me = _build("minkowski", "cpu") if "minkowski" in available_backends() and not args.no_minkowski else None
    if me is not None:
        me.load_state_dict(model.state_dict())
    torch.set_num_threads(args.threads)
    _step(model, coords, feats, "cpu")
    if me is not None:
        _step(me, coords, feats, "cpu")
    runs: Dict[str, List[Dict[str, float]]] = {"one": [], "many": []}
    gaps: Dict[str, List[float]] = {}  # the many-thread steps' stretches outside the pool, summed
    me_times: List[float] = []
    for _ in range(args.repeats):  # alternated, so that load from other jobs hits every variant alike
        torch.set_num_threads(1)
        runs["one"].append(split_step(model, coords, feats)[0])
        torch.set_num_threads(args.threads)
        step, step_gaps = split_step(model, coords, feats)
        runs["many"].append(step)
        for label, g in step_gaps.items():
            total = gaps.setdefault(label, [0.0, 0.0, 0])
            for i in range(3):
                total[i] += g[i]
        if me is not None:
            me.zero_grad(set_to_none=True)
            me_times.append(_step(me, coords, feats, "cpu"))

    med = {v: {k: statistics.median(s[k] for s in steps) for k in steps[0]} for v, steps in runs.items()}
    one, many = med["one"], med["many"]
    for m in (one, many):
        m["out_wall"], m["out_cpu"] = m["wall"] - m["pool_wall"], m["cpu"] - m["pool_cpu"]
    scale = one["wall"] / profiled
    gemm_s = kinds["GEMMs"] * scale
    floor_idle = many["cpu"] / args.threads
    floor_work = one["wall"] / args.threads
    t = args.threads

    lines = [f"# Where a CPU step goes: Res16UNet34C forward+backward, torch backend, {args.voxels} voxels", "",
             f"Command: `python -m bench.cpu_floor --voxels {args.voxels} --threads {t} --repeats {args.repeats}"
             + "".join(" " + a for a in input_args()) + (f" --out {args.out}" if args.out else "") + "`  ",
             f"torch {torch.__version__}; commit {git_commit()}; {time.strftime('%Y-%m-%d %H:%M')}. Medians of {args.repeats} steps per "
             "variant, variants alternated; step as in `bench/backbone.py`.", "", f"Input: {input_description()}.", "",
             f"## One thread: {one['wall']:.2f} s per step", "",
             "Time by kind of work, from one profiled step (inclusive time of the top-level aten ops; the kernel "
             f"maps as a whole), scaled to the unprofiled step (the profiled one took {profiled:.2f} s):", "",
             "| work | seconds | share |", "|---|---:|---:|"]
    for name, sec in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {sec * scale:.2f} | {sec / profiled:.0%} |")
    lines += ["",
              f"GEMMs: {flops['executed_step_gflop']:.0f} GFLOP executed (useful {flops['step_gflop']:.0f}) in "
              f"{gemm_s:.2f} s = {flops['executed_step_gflop'] / gemm_s:.0f} GFLOP/s, "
              f"{flops['executed_step_gflop'] / gemm_s / peak1:.0%} of the one-thread matmul peak "
              f"({peak1:.0f} GFLOP/s, this run, through the backend's CPU GEMM: {gemm.describe()}).", "",
              f"## One thread against {t}", "",
              f"| part | 1 thread: seconds | {t} threads: wall | {t} threads: CPU | cores busy | CPU / 1 thread |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, w, c in (("inside the worker pool (convolutions)", "pool_wall", "pool_cpu"),
                        ("outside it (batch norm, ReLU, scatter-adds, maps, Python)", "out_wall", "out_cpu"),
                        ("whole step", "wall", "cpu")):
        lines.append(f"| {label} | {one[w]:.2f} | {many[w]:.2f} | {many[c]:.2f} | {many[c] / max(many[w], 1e-9):.2f} | "
                     f"{many[c] / max(one[w], 1e-9):.2f}x |")
    lines += ["", f"Outside the pool with {t} threads, by the op that started the next pool run (per step, "
              f"over {args.repeats} steps; idle = wall x {t} - CPU):", "",
              "| stretch | stretches | wall seconds | cores busy | idle core-seconds |", "|---|---:|---:|---:|---:|"]
    n = args.repeats
    for label, (w, c, k) in sorted(gaps.items(), key=lambda kv: -(kv[1][0] * t - kv[1][1])):
        lines.append(f"| {label} | {k / n:.0f} | {w / n:.3f} | {c / max(w, 1e-9):.2f} | {(w * t - c) / n:.3f} |")
    lines += ["", "## Floors", "",
              f"- No core ever idle: {t}-thread CPU seconds / {t} = {many['cpu']:.2f} / {t} = **{floor_idle:.2f} s**; "
              f"the measured step ({many['wall']:.2f} s) is {many['wall'] / floor_idle:.2f}x that.",
              f"- No core idle and no work added by running side by side: one-thread step / {t} = "
              f"{one['wall']:.2f} / {t} = **{floor_work:.2f} s**; the measured step is "
              f"{many['wall'] / floor_work:.2f}x that."]
    if me_times:
        me_med = statistics.median(me_times)
        lines += ["", f"MinkowskiEngine, alternated with these steps, {t} threads: {me_med:.2f} s per step. Ratio "
                  f"measured: **{me_med / many['wall']:.2f}x**; at the first floor {me_med / floor_idle:.2f}x, at the "
                  f"second {me_med / floor_work:.2f}x."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
