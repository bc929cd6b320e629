"""Benchmark: each GEMM and gather of one GPU-scheme training step, replayed alone.

    python -m bench.gpu_replay [--device cuda] [--voxels 100000] [--repeats 10] [--rows 25]
                               [--out reports/bench/gpu-replay.md]

One Res16UNet34C step (table plans, as on a GPU) runs under a ``TorchDispatchMode`` that records
every ``mm`` (shapes and strides of both operands) and every ``index_select`` (the source's shape,
the dimension and the real index). Each distinct one is then timed alone, median of
``--repeats``, and reported with its achieved TFLOP/s (GEMMs) or GB/s written (gathers), sorted
by its share of the step. Beside each gather: the same gather the other way round (whole rows of
row-major features against 4-byte elements of the transposed ones), which is how the table plans
came to gather channel-major (reports/bench/gpu-notes.md, version 6). On the CPU the table plans
are forced, for a dry run; its timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import emit, gpu_scheme  # noqa: E402


def record_step(model, coords, feats, device: str) -> Tuple[Dict, Dict]:
    """``mm`` and ``index_select`` calls of one step: {signature: calls}, {signature: [calls, index]}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.backbone import _step

    aten = torch.ops.aten
    gemms: Dict[tuple, int] = {}
    gathers: Dict[tuple, list] = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten.mm.default:
                a, b = args
                key = (tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()))
                gemms[key] = gemms.get(key, 0) + 1
            elif func is aten.index_select.default:
                src, dim, index = args
                key = (tuple(src.shape), int(dim), index.numel())
                gathers.setdefault(key, [0, index.clone()])[0] += 1
            return func(*args, **(kwargs or {}))

    model.zero_grad(set_to_none=True)
    with Recorder():
        _step(model, coords, feats, device)
    return gemms, gathers


def median_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    import torch

    fn()
    times: List[float] = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def replay(gemms: Dict, gathers: Dict, device: str, repeats: int) -> Tuple[List[dict], List[dict]]:
    import torch

    grows = []
    for (ash, ast, bsh, bst), calls in gemms.items():
        a = torch.empty_strided(ash, ast, device=device).normal_()
        b = torch.empty_strided(bsh, bst, device=device).normal_()
        s = median_seconds(lambda: torch.mm(a, b), device, repeats)
        layout = ("T" if ast[0] == 1 and ash[0] > 1 else "N") + ("T" if bst[0] == 1 and bsh[0] > 1 else "N")
        grows.append({"shape": f"({ash[0]} x {ash[1]})({bsh[0]} x {bsh[1]}) {layout}", "calls": calls,
                      "ms": s * 1e3, "rate": 2 * ash[0] * ash[1] * bsh[1] / s / 1e12})
    rows = []
    for (ssh, dim, n), (calls, index) in gathers.items():
        src = torch.randn(ssh, device=device)
        s = median_seconds(lambda: src.index_select(dim, index), device, repeats)
        width = ssh[1 - dim] if len(ssh) == 2 else 1
        other = None
        if len(ssh) == 2 and width > 1:  # the same gather the other way round
            flipped = src.t().contiguous()
            other = median_seconds(lambda: flipped.index_select(1 - dim, index), device, repeats) * 1e3
        rows.append({"shape": f"{ssh[0]} x {ssh[1]}, dim {dim}, {n} entries", "calls": calls, "ms": s * 1e3,
                     "rate": n * width * src.element_size() / s / 1e9, "other_ms": other})
    for r in grows + rows:
        r["total_ms"] = r["ms"] * r["calls"]
    return (sorted(grows, key=lambda r: -r["total_ms"]), sorted(rows, key=lambda r: -r["total_ms"]))


def render(args, device_name: str, step_ms: float, grows: List[dict], rows: List[dict]) -> List[str]:
    gsum, tsum = sum(r["total_ms"] for r in grows), sum(r["total_ms"] for r in rows)
    lines = [f"# One step's GEMMs and gathers replayed alone ({device_name}, {args.voxels} voxels, fp32)", "",
             f"Command: `python -m bench.gpu_replay --device {args.device} --voxels {args.voxels}`. The step "
             f"itself: {step_ms:.1f} ms (median of 5). Replayed: GEMMs {gsum:.1f} ms, gathers {tsum:.1f} ms per step "
             f"({len(grows)} and {len(rows)} distinct calls; the top {args.rows} of each below).", "",
             "Layouts: N an operand stored row-major, T one stored column-major (a transposed view).", "",
             "| GEMM (A)(B), layouts | calls | ms each | TFLOP/s | ms per step |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['calls']} | {r['ms']:.3f} | {r['rate']:.1f} | {r['total_ms']:.2f} |"
              for r in grows[:args.rows]]
    lines += ["", "| gather (source, dim, entries) | calls | ms each | GB/s written | the other way round, ms | "
              "ms per step |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['calls']} | {r['ms']:.3f} | {r['rate']:.0f} | "
              f"{'' if r['other_ms'] is None else format(r['other_ms'], '.3f')} | {r['total_ms']:.2f} |"
              for r in rows[:args.rows]]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--voxels", type=int, default=100000)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default=None, help="also write the report as markdown here")
    args = p.parse_args(argv)

    import harness  # noqa: F401  (before torch: thread settings)
    import torch

    from bench.backbone import _build, _step, make_input

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    coords, feats = make_input(args.voxels)
    c, f = coords.to(args.device), feats.to(args.device)
    with gpu_scheme():
        model = _build("torch", args.device)
        steps = []
        for _ in range(7):
            model.zero_grad(set_to_none=True)
            steps.append(_step(model, c, f, args.device) * 1e3)
        gemms, gathers = record_step(model, c, f, args.device)
    grows, rows = replay(gemms, gathers, args.device, args.repeats)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU, dry run"
    emit(render(args, name, statistics.median(steps[2:]), grows, rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
