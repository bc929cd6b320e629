"""Benchmark: host ops per Res16UNet34C step in the GPU's scheme, counted on the CPU.

    python -m bench.launches [--voxels 100000] [--out reports/bench/launches.md]

On a GPU every op is a kernel launch the host must issue, and a step of thousands of small
GEMMs is bound by the host, not the GPU. This counts, with the torch profiler, the top-level
aten ops of one forward+backward step with no coordinate set in buckets (as on a GPU), once
with table plans (one gather and one GEMM per convolution, what a GPU runs:
:class:`harness.backbones.kernel_map.TablePlan`) and once with one GEMM per kernel offset,
side by side on the same input. It needs no GPU: the ops a step issues do not depend on the device. View
ops (slices, selects) launch nothing but still cost the host a dispatch each; most other ops
launch a kernel or more.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import emit, gpu_scheme  # noqa: E402

VIEWS = {"aten::slice", "aten::select", "aten::view", "aten::t", "aten::transpose", "aten::unsqueeze",
         "aten::reshape", "aten::detach", "aten::as_strided", "aten::alias", "aten::expand", "aten::lift_fresh"}
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_"}


def top_level_ops(events, marks: Iterable[str] = ()) -> Iterator:
    """Profiler events of aten ops not called inside another aten op, and of the ranges named
    in ``marks`` (whose ops are not looked into)."""
    marks = frozenset(marks)

    def walk(evt) -> Iterator:
        if evt.name.startswith("aten::") or evt.name in marks:
            yield evt
            return
        for child in evt.cpu_children:
            yield from walk(child)

    for evt in events:
        if evt.cpu_parent is None:
            yield from walk(evt)


def count_ops(model, coords, feats) -> collections.Counter:
    """Top-level aten ops of one training step (ops called inside another aten op not counted)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.backbone import _step

    _step(model, coords, feats, "cpu")
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, coords, feats, "cpu")
    return collections.Counter(evt.name for evt in top_level_ops(prof.events()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voxels", type=int, default=100000)
    p.add_argument("--out", default=None, help="also write the table as markdown here")
    args = p.parse_args(argv)

    import harness  # noqa: F401  (before torch: thread settings)
    import torch

    from bench.backbone import _build, make_input

    torch.set_num_threads(1)  # one worker: every task runs on the calling thread, as on a GPU
    coords, feats = make_input(args.voxels)
    model = _build("torch", "cpu")
    rows = []
    for name, table in (("one GEMM per offset", False), ("table plans", True)):
        with gpu_scheme(table_plans=table):
            c = count_ops(model, coords, feats)
        total = sum(c.values())
        views = sum(v for k, v in c.items() if k in VIEWS)
        rows.append((name, total, total - views, sum(v for k, v in c.items() if k in GEMMS)))
    base = rows[0]
    lines = [f"# Host ops per Res16UNet34C training step in the GPU's scheme ({args.voxels} voxels)", "",
             "Command: `python -m bench.launches" + (f" --voxels {args.voxels}" if args.voxels != 100000 else "")
             + "`. Counted with the torch profiler on the CPU (top-level aten ops; the ops a step issues do not "
             "depend on the device).", "",
             "| scheme | ops | of them not views | GEMMs | fewer ops than per offset |",
             "|---|---:|---:|---:|---:|"]
    for name, total, launching, gemms in rows:
        lines.append(f"| {name} | {total} | {launching} | {gemms} | {base[1] / total:.1f}x |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
