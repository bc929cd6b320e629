"""Benchmark: Res16UNet34C forward+backward, torch backend against MinkowskiEngine, same run.

    python bench/backbone.py [--sizes 20000 100000 300000] [--repeats 3] [--budget-s 150] [--threads 2]
                             [--out reports/bench/backbone.md] [--no-memory] [--no-bf16]
                             [--input rooms|scannet] [--scannet-root DIR]

Input (``--input``): room-like surfaces (harness.backbones.synthetic.room_batch) voxelised at 2
cm with RGB-like features, or real ScanNet meshes (``scan_batch``: mesh vertices at 2 cm, as
training sees them, with their colours); train mode, loss = mean of squared outputs. One step
= build the sparse input from (coords, feats), forward, backward (kernel maps built inside the
step on both backends). The two backends alternate step by step so that load from other jobs hits both alike; only
their ratio is meaningful on a shared machine, and the report says how busy the other jobs
kept the CPU during the run. Peak memory is measured per (backend, size) in a fresh process
(peak RSS during two steps minus RSS before the first). The step's useful FLOPs are counted
from the kernel maps (2 x pairs x C_in x C_out per convolution, x3 for forward+backward, less
the stem's input gradient, which no backend computes), and achieved GFLOP/s are compared with
the fp32 matmul peak measured in the same run on the same device; on a GPU the report also
gives the GPU time of the step's matrix products alone (CUDA profiler) as TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _set_threads(n: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(n))


class CpuMonitor:
    """How many cores other processes kept busy between start() and stop() (Linux /proc)."""

    def __init__(self):
        self.other_cores: Optional[float] = None

    @staticmethod
    def _busy_seconds() -> Optional[float]:
        try:
            v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        return (sum(v[:8]) - v[3] - v[4]) / hz

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> "CpuMonitor":
        self.t0, self.b0, self.o0 = time.time(), self._busy_seconds(), self._own_seconds()
        return self

    def stop(self) -> Optional[float]:
        b1 = self._busy_seconds()
        if b1 is None or self.b0 is None:
            return None
        wall = max(time.time() - self.t0, 1e-9)
        self.other_cores = max(0.0, ((b1 - self.b0) - (self._own_seconds() - self.o0)) / wall)
        return self.other_cores


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype_name: str = "float32", device: str = "cpu", reps: int = 3) -> float:
    """Best GFLOP/s of one square matmul on ``device`` (torch's own matmul settings, so no
    TF32 unless the caller enabled it, as for the convolutions). CPU fp32: the library the
    torch backend's convolutions use (:mod:`harness.backbones.gemm`), on its worker threads."""
    import torch

    if device == "cpu" and dtype_name == "float32":
        return cpu_gemm_peak(reps)
    n = 8192 if device.startswith("cuda") else 4096
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def cpu_gemm_peak(reps: int = 3, n: int = 2048) -> float:
    """Best GFLOP/s of fp32 n x n products through the torch backend's CPU GEMM, one per worker
    thread side by side (as its convolutions run them), 4 rounds per worker."""
    import torch

    from harness.backbones import gemm
    from harness.backbones.workers import run_tasks, worker_count

    workers = worker_count(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    mats = [(torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen), torch.empty(n, n))
            for _ in range(workers)]

    def task(t: int, w: int) -> None:
        a, b, out = mats[w]
        gemm.mm(a, b, out=out)

    tasks = 4 * workers
    run_tasks(task, tasks, torch.device("cpu"))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run_tasks(task, tasks, torch.device("cpu"))
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * tasks / best / 1e9


def gemm_seconds(coords, feats, device: str) -> Optional[float]:
    """GPU time of the matrix products in one torch-backend step (CUDA profiler), or None off
    CUDA: the convolutions' GEMMs alone, against which the GPU's matmul peak is a fair yardstick."""
    if not device.startswith("cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    model = _build("torch", device)
    c, f = coords.to(device), feats.to(device)
    _step(model, c, f, device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.zero_grad(set_to_none=True)
        _step(model, c, f, device)
    total_us = 0.0
    for evt in prof.key_averages():
        if evt.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
            total_us += getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
    return total_us / 1e6 if total_us > 0 else None


# Where the benchmark's input comes from (``--input``): synthetic rooms, or real ScanNet meshes.
INPUTS = ("rooms", "scannet")
_INPUT = {"source": "rooms", "scannet_root": None}


def default_scannet_root() -> Path:
    """The ScanNet release files next to the checkout (``$HARNESS_SAMPLES/scannet``, as the tests)."""
    return Path(os.environ.get("HARNESS_SAMPLES", ROOT.parent / "shared" / "samples")) / "scannet"


def scan_files(root: Optional[Path] = None) -> List[Path]:
    """The ``_vh_clean_2.ply`` meshes under a ScanNet root (default: ``--scannet-root``, else
    :func:`default_scannet_root`)."""
    root = root or _INPUT["scannet_root"] or default_scannet_root()
    files = sorted(Path(root).glob("scans/*/*_vh_clean_2.ply"))
    if not files:
        raise FileNotFoundError(f"--input scannet: no scans/<scene>/<scene>_vh_clean_2.ply under {root} "
                                "(give --scannet-root, or set HARNESS_SAMPLES)")
    return files


def scan_batch(n_voxels: int, files: List[Path], voxel_size: float = 0.02, seed: int = 0):
    """About ``n_voxels`` voxels of real ScanNet scenes as a batch: each scene's mesh vertices
    (what training on ScanNet voxelises), turned by a random yaw and shifted off the grid,
    voxelised at ``voxel_size`` (first point), colours scaled to [-0.5, 0.5]. Scenes repeat,
    each copy turned anew, until the target; the last is cut as :func:`room_batch`'s."""
    import numpy as np

    from harness.backbones.synthetic import partial_scan
    from harness.backbones.voxelize import voxelize
    from harness.data.ply import read_ply

    rng = np.random.default_rng(seed)
    scenes = []
    for f in files:
        mesh = read_ply(f)
        pts = np.stack([mesh["x"], mesh["y"], mesh["z"]], -1).astype(np.float64)
        rgb = np.stack([mesh["red"], mesh["green"], mesh["blue"]], -1).astype(np.float32) / 255.0 - 0.5
        scenes.append((pts, rgb))
    coords_list, feats_list, total = [], [], 0
    while total < n_voxels:
        pts, rgb = scenes[len(coords_list) % len(scenes)]
        c, s = np.cos(yaw := rng.uniform(0, 2 * np.pi)), np.sin(yaw)
        turned = pts @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T + rng.uniform(-1.0, 1.0, size=3)
        v = voxelize(turned, voxel_size)
        order = rng.permutation(len(v))  # scanners do not emit voxels in lexicographic order
        vox, feats = v.coords[order], rgb[v.index[order]]
        keep = partial_scan(vox, n_voxels - total, rng)
        b = np.full((len(keep), 1), len(coords_list), np.int32)
        coords_list.append(np.concatenate([b, vox[keep].astype(np.int32)], axis=1))
        feats_list.append(feats[keep])
        total += len(keep)
    return np.concatenate(coords_list), np.concatenate(feats_list).astype(np.float32)


def make_input(n_voxels: int, seed: int = 0):
    """(coords, feats) of about ``n_voxels`` voxels from the source ``--input`` chose."""
    import torch

    from harness.backbones.synthetic import room_batch

    if _INPUT["source"] == "scannet":
        coords, colors = scan_batch(n_voxels, scan_files(), seed=seed)
    else:
        coords, colors = room_batch(n_voxels, voxel_size=0.02, seed=seed)
    return torch.from_numpy(coords), torch.from_numpy(colors)


def input_description() -> str:
    if _INPUT["source"] == "scannet":
        names = ", ".join(f.parent.name for f in scan_files())
        return (f"real ScanNet meshes ({names}): mesh vertices voxelised at 2 cm as training on ScanNet does, "
                "each copy turned by a random yaw and shifted, copies added until the size is reached "
                "(`bench/backbone.py: scan_batch`), colours as features")
    return ("room-like surfaces (floor, walls, furniture) sampled and voxelised at 2 cm "
            "(`harness.backbones.synthetic.room_batch`)")


def count_flops(coords, feats, device: str = "cpu") -> Dict[str, float]:
    """Useful and executed (with the torch backend's padding on ``device``) FLOPs of one
    fwd+bwd step."""
    import torch

    from harness.backbones import build_backbone
    from harness.backbones.torch_backend import SparseConv, SparseConvTranspose

    model = build_backbone("Res16UNet34C", 3, 32, backend="torch").to(device)
    recs = []

    def hook(mod, inp, _out):
        x = inp[0]
        mgr, cin, cout = x.manager, mod.in_channels, mod.out_channels
        if mod.kernel_size == 1:
            pairs = executed = x.F.shape[0]
        elif mod.kernel_size == 3:
            lv = mgr.level(x.stride)
            pairs, executed = lv.n_pairs, lv.plan.n_entries
        else:  # kernel 2, stride 2: one pair per fine site (its parent)
            dm = mgr.down_maps[x.stride // 2] if isinstance(mod, SparseConvTranspose) else mgr.down_map(x.stride)
            pairs, executed = dm.parent.numel(), dm.down.n_entries
        recs.append((mod is model.conv0p1s1, 2.0 * pairs * cin * cout, 2.0 * executed * cin * cout))

    for m in model.modules():
        if isinstance(m, SparseConv):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(coords.to(device), feats.to(device))
    fwd = sum(r[1] for r in recs)
    stem = sum(r[1] for r in recs if r[0])
    ex = sum(r[2] for r in recs)
    ex_stem = sum(r[2] for r in recs if r[0])
    return {"fwd_gflop": fwd / 1e9, "step_gflop": (3 * fwd - stem) / 1e9, "executed_step_gflop": (3 * ex - ex_stem) / 1e9,
            "sites": int(coords.shape[0]), "neighbours": None}


def _build(backend: str, device: str):
    import torch

    from harness.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("Res16UNet34C", 3, 32, backend=backend).to(device).train()


def _step(model, coords, feats, device: str, autocast: bool = False, issued: Optional[List[float]] = None) -> float:
    """Seconds of one training step; ``issued`` gets the seconds until the host had issued
    all of its ops (on a GPU the device may still be working then)."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
        out = model(coords, feats)
        loss = out.float().square().mean()
    loss.backward()
    if issued is not None:
        issued.append(time.perf_counter() - t0)
    _sync(device)
    return time.perf_counter() - t0


def time_backends(backends: List[str], coords, feats, device: str, repeats: int, warmup: int = 1,
                  bf16: bool = False, issued: Optional[Dict[str, List[float]]] = None, budget_s: float = 0.0,
                  max_repeats: int = 0) -> Dict[str, List[float]]:
    """Step seconds per variant: ``repeats`` rounds (one step of each variant) after ``warmup``,
    then more rounds while the timed ones have taken less than ``budget_s`` seconds, up to
    ``max_repeats`` (a median of 3 pairs moved the 100k ratio by 10% from run to run; small
    sizes get many pairs for the same time, large ones the minimum). ``issued`` (filled per
    variant when given): the seconds until each step's ops were all issued."""
    models = {b: _build(b, device if b == "torch" else "cpu") for b in backends}
    state = models[backends[0]].state_dict()
    for m in models.values():
        m.load_state_dict(state)
    import torch

    from harness.train import set_tf32

    # (backend, bf16 autocast, TF32, name); on a GPU the plain rows are IEEE float32, and
    # torch+tf32 is what the trainer runs by default there (trainer.tf32)
    cuda = device.startswith("cuda")
    variants = [(b, False, False, b) for b in backends] + ([("torch", False, True, "torch+tf32")] if cuda else [])
    variants += [("torch", True, False, "torch+bf16")] if bf16 else []
    times: Dict[str, List[float]] = {v[3]: [] for v in variants}
    it, timed_s = 0, 0.0
    while it < warmup + repeats or (timed_s < budget_s and it < warmup + max_repeats):
        t_round = time.perf_counter()
        for b, a, tf32, name in variants:
            dev = device if b == "torch" else "cpu"
            c, f = coords.to(dev), feats.to(dev)
            models[b].zero_grad(set_to_none=True)
            sink: List[float] = []
            set_tf32(torch.device(dev), tf32)
            dt = _step(models[b], c, f, dev, autocast=a, issued=sink)
            set_tf32(torch.device(dev), False)
            if it >= warmup:
                times[name].append(dt)
                if issued is not None:
                    issued.setdefault(name, []).append(sink[0])
        if it >= warmup:
            timed_s += time.perf_counter() - t_round
        it += 1
    return times


def bf16_drift(coords, feats, device: str) -> Dict[str, float]:
    """How far bf16 autocast outputs and gradients drift from fp32 (same weights and input)."""
    import torch

    model = _build("torch", device)
    out = {}
    for mode in ("eval", "train"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        getattr(model, mode)()
        res = []
        for ac in (False, True):
            model.load_state_dict(state)
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=ac):
                o = model(coords.to(device), feats.to(device))
            o.float().square().mean().backward()
            res.append((o.float().detach(), model.block8[1].conv2.kernel.grad.float().clone()))
        (o32, g32), (o16, g16) = res
        out[f"{mode}_out_rel"] = float((o16 - o32).norm() / o32.norm())
        out[f"{mode}_out_maxrel"] = float((o16 - o32).abs().max() / o32.abs().max())
        out[f"{mode}_grad_rel"] = float((g16 - g32).norm() / g32.norm())
    return out


def memory_child(backend: str, n_voxels: int, device: str, threads: int) -> Dict[str, float]:
    """Runs in a fresh process: RSS before the first step and peak RSS over two steps."""
    import torch

    torch.set_num_threads(threads)
    dev = device if backend == "torch" else "cpu"
    coords, feats = (t.to(dev) for t in make_input(n_voxels))
    model = _build(backend, dev)
    import gc

    gc.collect()
    _reset_peak_rss()  # the scene generator's own peak must not count
    rss0 = _status_mb("VmRSS")
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        _step(model, coords, feats, dev)
    peak = _status_mb("VmHWM")
    res = {"rss_before_mb": rss0, "peak_rss_mb": peak, "step_mb": peak - rss0}
    if device.startswith("cuda") and backend == "torch":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def cpu_child(backend: str, n_voxels: int, steps: int) -> Dict[str, float]:
    """Runs in a fresh process with every thread pool at 1: CPU seconds per step (process
    time, all threads). Unlike wall time this hardly depends on what other jobs run."""
    import torch

    torch.set_num_threads(1)
    coords, feats = make_input(n_voxels)
    model = _build(backend, "cpu")
    times = []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.process_time()
        _step(model, coords, feats, "cpu")
        if i:
            times.append(time.process_time() - t0)
    return {"cpu_s": min(times), "cpu_s_all": times}


def add_input_options(p: argparse.ArgumentParser) -> None:
    """``--input`` and ``--scannet-root``, for every benchmark that takes this module's inputs."""
    p.add_argument("--input", choices=INPUTS, default="rooms",
                   help="rooms: synthetic room surfaces; scannet: real ScanNet meshes (--scannet-root)")
    p.add_argument("--scannet-root", type=Path, default=None,
                   help="a ScanNet root with scans/<scene>/<scene>_vh_clean_2.ply (default $HARNESS_SAMPLES/scannet)")


def use_input(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Make ``args.input`` the source of :func:`make_input`; a ScanNet root without meshes is
    a usage error naming it."""
    _INPUT.update(source=args.input, scannet_root=args.scannet_root)
    if args.input == "scannet":
        try:
            scan_files()
        except FileNotFoundError as exc:
            p.error(str(exc))


def input_args() -> List[str]:
    """The command-line arguments that give a child process this run's input."""
    root = _INPUT["scannet_root"]
    return ["--input", _INPUT["source"]] + (["--scannet-root", str(root)] if root else [])


def measure_cpu(backend: str, n: int, steps: int) -> Optional[Dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--cpu-child", backend, str(n), "--repeats", str(steps), "--threads", "1",
           *input_args()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"cpu run {backend} {n} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM (peak RSS) of this process in MB (Linux), else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def measure_memory(backend: str, n: int, device: str, threads: int) -> Optional[Dict[str, float]]:
    cmd = [sys.executable, __file__, "--memory-child", backend, str(n), "--device", device, "--threads", str(threads),
           *input_args()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        print(f"memory run {backend} {n} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _secs(t: float, unit_of: Optional[float] = None) -> str:
    """Seconds, or milliseconds when ``unit_of`` (default ``t``) is below a second."""
    return f"{t * 1e3:.1f} ms" if (t if unit_of is None else unit_of) < 1.0 else f"{t:.2f} s"


# Confidence level of the interval given for each per-pair median ratio.
PAIR_INTERVAL_LEVEL = 0.95


def render(results: Dict) -> str:
    from harness.reporting.stats import median_interval

    env = results["env"]
    lines = ["# Backbone benchmark: Res16UNet34C forward+backward", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {env['cpu']}, {env['threads']} threads, device {env['device']}"
             f"{' (' + env['gpu'] + ')' if env.get('gpu') else ''}; torch {env['torch']}, "
             f"MinkowskiEngine {env['minkowski'] or 'not installed'}; {env['date']}; "
             f"OpenMP wait policy {env.get('omp_wait_policy', 'default')}, OpenBLAS thread timeout "
             f"{env.get('openblas_thread_timeout', 'default')} for both backends.  ",
             *([f"CPU GEMMs of the torch backend: {env['cpu_gemm']}; OpenBLAS kernels: "
                + (", ".join(f"{k} {v}" for k, v in env['openblas_cores'].items()) or "none loaded")
                + f" (OPENBLAS_CORETYPE {env.get('openblas_coretype') or 'unset'}).  "] if env.get("cpu_gemm") else []),
             f"fp32 matmul peak measured in this run: {env['peak_fp32']:.0f} GFLOP/s"
             f"{' (that GEMM, one 2048^3 product per worker thread side by side)' if env.get('cpu_gemm') else ''} "
             f"(bf16: {env['peak_bf16']:.0f}).  ",
             f"Other jobs kept {results['other_cores']:.2f} of the {env['ncpu']} cores busy on average during the "
             "timing (a shared machine: compare the ratio, not the seconds).", "",
             f"Input: {results.get('input', input_description())}, train mode, one step = sparse input from "
             "(coords, feats) + forward + backward, kernel maps built inside the step on both backends; "
             "the backends alternate step by step; median of the timed steps (min in brackets); `pairs`: "
             "timed steps per backend (after a warm-up; more where a step is short).", "",
             "`ME / torch` is the ratio of the medians; `per pair` is the median of the ratios of the steps run "
             "back to back (load from other jobs that drifts during the run cancels in each pair), in square "
             f"brackets a distribution-free {PAIR_INTERVAL_LEVEL:.0%} confidence interval for that median (order "
             f"statistics; with too few pairs for {PAIR_INTERVAL_LEVEL:.0%}, the full range and its coverage), in "
             "parentheses the range.", "",
             "| voxels | neighbours/site | useful GFLOP/step | backend | pairs | time per step | ME / torch | per pair | GFLOP/s | of fp32 peak | peak memory (MB) |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        n, fl = row["sites"], row["flops"]
        me = row["times"].get("minkowski")
        for b, ts in row["times"].items():
            med, mn = statistics.median(ts), min(ts)
            ratio = f"{statistics.median(me) / med:.2f}x" if me and b != "minkowski" else ("1.00x" if b == "minkowski" else "")
            pairs = [m / t for m, t in zip(me, ts)] if me and b != "minkowski" else []
            per_pair = ""
            if pairs:
                lo, hi, cov = median_interval(pairs, PAIR_INTERVAL_LEVEL)
                level = "" if cov >= PAIR_INTERVAL_LEVEL else f" at {cov:.0%}"
                per_pair = f"{statistics.median(pairs):.2f}x [{lo:.2f}-{hi:.2f}{level}] ({min(pairs):.2f}-{max(pairs):.2f})"
            gfs = fl["step_gflop"] / med
            mem = row["memory"].get(b)
            mem_s = f"{mem.get('cuda_peak_mb', mem['step_mb']):.0f}" if mem else "n/a"
            lines.append(f"| {n} | {row['neighbours']:.1f} | {fl['step_gflop']:.0f} | {b} | {len(ts)} | {_secs(med)} ({_secs(mn, med)}) | {ratio} | "
                         f"{per_pair} | {gfs:.0f} | {gfs / env['peak_fp32']:.0%} | {mem_s} |")
    lines += ["", "Peak memory = peak RSS during two steps minus RSS before the first, each backend and size in a "
              "fresh process (on a GPU: the torch backend's peak allocated GPU memory). `torch+bf16` = torch "
              "backend under `torch.autocast(device, bfloat16)`; its GFLOP/s column still counts against the fp32 peak."
              + (" On a GPU `torch` is IEEE float32 and `torch+tf32` lets the float32 GEMMs use TF32 tensor cores "
                 "(the trainer's default there: `trainer.tf32`)." if env["device"].startswith("cuda") else ""), ""]
    gemm = [(row["sites"], row["flops"]["executed_step_gflop"], row["gemm_s"]) for row in results["rows"] if row.get("gemm_s")]
    if gemm:
        lines += ["Convolution GEMMs alone (GPU time of the step's matrix products, CUDA profiler, fp32): " + ", ".join(
            f"{n} voxels {g / t / 1e3:.1f} TFLOP/s in {t * 1e3:.1f} ms ({g / t / env['peak_fp32']:.0%} of the "
            f"{env['peak_fp32'] / 1e3:.1f} TFLOP/s matmul peak)" for n, g, t in gemm) + ".", ""]
    issued = [(row["sites"], b, statistics.median(ts), statistics.median(row["times"][b]))
              for row in results["rows"] for b, ts in (row.get("issued") or {}).items()]
    if issued:
        lines += ["Host side (medians): the host had issued all of a step's ops after " + ", ".join(
            f"{i * 1e3:.1f} of {t * 1e3:.1f} ms ({n} voxels, {b})" for n, b, i, t in issued) +
                  ". Where the two are close, Python, dispatch and kernel launches bound the step, not the GPU "
                  "(`python -m bench.launches` counts the ops).", ""]
    if results.get("padding"):
        lines += ["Torch backend: multiplications executed including the zero padding of its buckets, per step: " +
                  ", ".join(f"{n} voxels {p['executed_step_gflop']:.0f} GFLOP (+{p['executed_step_gflop'] / p['step_gflop'] - 1:.0%})"
                            for n, p in results["padding"].items()) + ".", ""]
    if results.get("cpu"):
        lines += ["Work per step, all thread pools at 1 (CPU seconds, process time, min of the steps; "
                  "not inflated by other jobs taking turns on the cores, as the wall times above are; jobs "
                  "sharing the host's caches and memory still move it by several percent between runs):", "",
                  "| voxels | " + " | ".join(f"{b} CPU s" for b in next(iter(results["cpu"].values()))) + " | ME / torch |",
                  "|---:|" + "---:|" * (len(next(iter(results["cpu"].values()))) + 1)]
        for n, per in results["cpu"].items():
            vals = {b: (v["cpu_s"] if v else float("nan")) for b, v in per.items()}
            ratio = f"{vals['minkowski'] / vals['torch']:.2f}x" if "minkowski" in vals and "torch" in vals else ""
            lines.append(f"| ~{n} | " + " | ".join(f"{v:.2f}" for v in vals.values()) + f" | {ratio} |")
        lines.append("")
    if results.get("drift"):
        d = results["drift"]
        lines += [f"bf16 autocast drift from fp32 ({results['drift_voxels']} voxels, same weights): outputs "
                  f"{d['eval_out_rel']:.1e} relative (L2; max-abs {d['eval_out_maxrel']:.1e}) in eval mode, "
                  f"{d['train_out_rel']:.1e} in train mode; weight gradient of block8.1.conv2 {d['train_grad_rel']:.1e} "
                  "relative in train mode.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000, 300000])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per size at least")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="more rounds per size while the timed ones took less than this (seconds)")
    p.add_argument("--max-repeats", type=int, default=15, help="timed rounds per size at most")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--out", default=None, help="the report (default: reports/bench/backbone.md; with --render, "
                   "the markdown file next to the JSON); its data go to the same name with .json")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="write the report of an earlier run again from its JSON (a newer layout), measuring nothing")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--cpu-sizes", type=int, nargs="*", default=[100000],
                   help="sizes for the single-thread CPU-time comparison (none to skip)")
    add_input_options(p)
    p.add_argument("--memory-child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    p.add_argument("--cpu-child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render:
        src = Path(args.render)
        out = Path(args.out) if args.out else src.with_suffix(".md")
        out.write_text(render(json.loads(src.read_text())))
        print(f"bench wrote {out}")
        return 0
    use_input(p, args)
    _set_threads(args.threads)
    import harness  # noqa: F401  (before torch and ME: OpenMP and OpenBLAS settings, see harness/__init__.py)
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]), device, args.threads)))
        return 0
    if args.cpu_child:
        print(json.dumps(cpu_child(args.cpu_child[0], int(args.cpu_child[1]), args.repeats)))
        return 0
    from harness.backbones import available_backends

    # The MinkowskiEngine build here is CPU-only: compare with it on the CPU.
    default = ["torch", "minkowski"] if "minkowski" in available_backends() and device == "cpu" else ["torch"]
    backends = args.backends or default
    me_version = None
    if "minkowski" in backends:
        from harness.backbones.minkowski import ME

        me_version = ME.__version__
    bf16 = not args.no_bf16 and (device != "cpu" or torch.backends.mkldnn.is_available())
    env = {"cpu": cpu_name(), "threads": args.threads, "ncpu": os.cpu_count(), "device": device,
           "torch": torch.__version__, "minkowski": me_version, "date": time.strftime("%Y-%m-%d %H:%M"),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default"),
           "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
           "peak_fp32": matmul_peak("float32", device), "peak_bf16": matmul_peak("bfloat16", device)}
    if device == "cpu":
        from harness.backbones import gemm

        env.update(cpu_gemm=gemm.describe(), openblas_cores=gemm.openblas_cores(),
                   openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"))
    results = {"command": "python bench/backbone.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "env": env, "rows": [], "padding": {}, "input": input_description()}
    mon = CpuMonitor().start()
    for n in args.sizes:
        coords, feats = make_input(n)
        from harness.backbones.kernel_map import CoordinateManager

        cm = CoordinateManager(coords)
        neigh = cm.level(1).n_pairs / len(coords)
        flops = count_flops(coords, feats, device)
        print(f"bench n={len(coords)} neighbours={neigh:.1f} step_gflop={flops['step_gflop']:.0f}", flush=True)
        issued: Dict[str, List[float]] = {}
        times = time_backends(backends, coords, feats, device, args.repeats, args.warmup, bf16=bf16,
                              issued=issued if device.startswith("cuda") else None, budget_s=args.budget_s,
                              max_repeats=args.max_repeats)
        for b, ts in times.items():
            print(f"bench n={len(coords)} backend={b} median_s={statistics.median(ts):.2f} min_s={min(ts):.2f}", flush=True)
        results["rows"].append({"sites": len(coords), "neighbours": neigh, "flops": flops, "times": times, "memory": {},
                                "gemm_s": gemm_seconds(coords, feats, device), "issued": issued})
        results["padding"][len(coords)] = flops
    results["other_cores"] = mon.stop() or 0.0
    if not args.no_memory:
        for row in results["rows"]:
            for b in backends:
                row["memory"][b] = measure_memory(b, row["sites"], device, args.threads)
                print(f"bench memory n={row['sites']} backend={b} {row['memory'][b]}", flush=True)
    if device == "cpu" and args.cpu_sizes:
        results["cpu"] = {}
        for n in args.cpu_sizes:
            results["cpu"][n] = {b: measure_cpu(b, n, max(2, args.repeats - 1)) for b in backends}
            print(f"bench cpu n={n} {results['cpu'][n]}", flush=True)
    if bf16:
        n0 = min(args.sizes)
        c, f = make_input(n0)
        results["drift"] = bf16_drift(c, f, device)
        results["drift_voxels"] = len(c)
    out = Path(args.out or ROOT / "reports" / "bench" / "backbone.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(f"bench wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
