"""Benchmark: where a torch-backend Res16UNet34C step spends its time on a GPU, and what TF32
matrix products and bf16 autocast change.

    python -m bench.gpu_sweep [--device cuda] [--sizes 100000] [--repeats 8]
                              [--out reports/bench/gpu_sweep]

Per size, in one process and on one input: training steps (build the sparse input, forward,
backward, as in ``bench/backbone.py``) in IEEE fp32, with TF32 matrix products and under bf16
autocast, interleaved step by step so that drift hits every variant alike; medians in ms.
Beside them: the kernel maps alone (what the step spends building them), the ms until the host
had issued all of a step's ops (a step whose issue time is close to its total is bound by the
host, not the GPU), and a profile of one step (the device time of its kernels by op). A single
process; no MinkowskiEngine needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def map_seconds(model, coords, device: str) -> float:
    """Seconds to build every coordinate set and kernel map a forward pass uses."""
    from bench.backbone import _sync
    from harness.backbones.kernel_map import CoordinateManager

    _sync(device)
    t0 = time.perf_counter()
    cm = CoordinateManager(coords, widths=model.level_widths())
    for s in (1, 2, 4, 8):
        cm.level(s).plan
        cm.down_map(s)
    cm.level(16).plan
    _sync(device)
    return time.perf_counter() - t0


def profile_table(model, coords, feats, device: str, rows: int = 25) -> Dict:
    """One profiled step: device time per op (self), total device time of kernels, wall time."""
    from torch.profiler import ProfilerActivity, profile

    from bench.backbone import _step

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    model.zero_grad(set_to_none=True)
    with profile(activities=acts) as prof:
        wall = _step(model, coords, feats, device)
    avgs = prof.key_averages()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    ranked = sorted(avgs, key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in avgs)
    top = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key, 0.0) / 1e3} for e in ranked[:rows]]
    return {"wall_ms": wall * 1e3, "self_total_ms": total / 1e3, "ops": sum(e.count for e in avgs), "top": top,
            "table": avgs.table(sort_by=key, row_limit=rows)}


def sweep(n: int, device: str, repeats: int, warmup: int) -> Dict:
    import torch

    from bench.backbone import _build, _step, make_input
    from harness.train import set_tf32

    coords, feats = make_input(n)
    c, f = coords.to(device), feats.to(device)
    model = _build("torch", device)
    variants = [("fp32", False, False), ("tf32", True, False), ("bf16 autocast", False, True)]
    times: Dict[str, List[float]] = {v[0]: [] for v in variants}
    issued: Dict[str, List[float]] = {v[0]: [] for v in variants}
    for it in range(warmup + repeats):
        order = variants if it % 2 == 0 else variants[::-1]
        for name, tf32, bf16 in order:
            model.zero_grad(set_to_none=True)
            sink: List[float] = []
            set_tf32(torch.device(device), tf32)
            dt = _step(model, c, f, device, autocast=bf16, issued=sink)
            set_tf32(torch.device(device), False)
            if it >= warmup:
                times[name].append(dt)
                issued[name].append(sink[0])
    maps = [map_seconds(model, c, device) for _ in range(3)]
    res = {"sites": len(coords),
           "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
           "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
           "issued_ms": {k: statistics.median(v) * 1e3 for k, v in issued.items()},
           "maps_ms": statistics.median(maps) * 1e3}
    if device.startswith("cuda"):
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["profile"] = profile_table(model, c, f, device)
    return res


def render(results: Dict) -> str:
    lines = [f"# GPU step sweep ({results['device']}, torch {results['torch']})", "",
             f"Command: `{results['command']}`", ""]
    for r in results["sizes"]:
        lines += [f"## {r['sites']} voxels", "",
                  f"Kernel maps alone: {r['maps_ms']:.1f} ms per step. Peak GPU memory: {r.get('peak_mem_mb', 0):.0f} MB.",
                  "", "| variant | median ms | min ms | host issued all ops by (ms) |", "| --- | ---: | ---: | ---: |"]
        for k in r["median_ms"]:
            lines.append(f"| {k} | {r['median_ms'][k]:.1f} | {r['min_ms'][k]:.1f} | {r['issued_ms'][k]:.1f} |")
        p = r["profile"]
        lines += ["", f"Profiled step (fp32): {p['wall_ms']:.1f} ms wall (profiler on), {p['self_total_ms']:.1f} ms of "
                  f"self time summed over ops, {p['ops']} op calls.", "", "```", p["table"], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[100000])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "gpu_sweep"))
    args = p.parse_args(argv)
    import harness  # noqa: F401  (before torch: OpenMP settings, see harness/__init__.py)
    import torch

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    results = {"command": "python -m bench.gpu_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "sizes": []}
    for n in args.sizes:
        r = sweep(n, args.device, args.repeats, args.warmup)
        results["sizes"].append(r)
        for k, v in r["median_ms"].items():
            print(f"sweep n={r['sites']} {k}: median {v:.1f} ms, issued {r['issued_ms'][k]:.1f} ms", flush=True)
        print(f"sweep n={r['sites']} maps {r['maps_ms']:.1f} ms", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(f"sweep wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
