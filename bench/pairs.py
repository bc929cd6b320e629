"""Benchmark: frame-pair mining of one ScanNet-size scene (about 100 frames of 640x480 depth).

The scene is synthetic (harness.data.rooms + harness.data.synth ray casting): a 5-7 m room
scanned along a loop with the camera looking across the room, written once in the SensReader
export layout (depth PNG in millimetres, camera-to-world pose, depth intrinsics of ScanNet's
depth camera) under the cache directory. The timed part is what pre-training runs per scene:
read the depth and poses from disk, voxelise every frame in world coordinates and find every
pair with overlap >= 30% (``baselines.pairs.mine_pairs``), at the published mining voxel
(5 cm) and at the pre-training voxel (2.5 cm). For scale, a per-pair KD-tree search (what the
public scripts do, here with scipy) is timed on a sample of pairs and extrapolated; its overlaps
are compared with the spatial-hash ones on that sample.

    python -m bench.pairs [--frames 100] [--out reports/bench/pairs.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from baselines.pairs import PairsConfig, _frame_geometry, mine_pairs, unpack_keys, voxel_keys, world_points
from harness.data.cache import atomic_write_text, ensure_generated
from harness.data.frames import FrameRef, write_depth_png

log = logging.getLogger("bench.pairs")
SCENE_VERSION = 1
# ScanNet's depth camera (640x480): fx, fy, cx, cy of a typical intrinsic_depth.txt
K_DEPTH = np.array([[577.59, 0.0, 318.91], [0.0, 578.73, 242.68], [0.0, 0.0, 1.0]])


def scan_poses(room: Any, rng: np.random.Generator, count: int) -> List[np.ndarray]:
    """A loop around the room, the camera looking across it (depth of about 1-6 m)."""
    from harness.data import synth

    W, D, _ = room.size
    centre = np.array([W / 2, D / 2])
    phase = rng.uniform(0, 2 * np.pi)
    poses = []
    for k in range(count):
        a = phase + 2 * np.pi * k / count
        eye = np.concatenate([centre + 0.32 * np.array([W, D]) * [np.cos(a), np.sin(a)], [rng.uniform(1.3, 1.6)]])
        b = a + np.pi * 0.8 + rng.uniform(-0.15, 0.15)
        target = np.concatenate([centre + 0.4 * np.array([W, D]) * [np.cos(b), np.sin(b)], [rng.uniform(0.5, 1.2)]])
        poses.append(synth.look_at(eye, target))
    return poses


def generate_scene(root: Path, frames: int, seed: int) -> None:
    from rich.progress import track

    from harness.data import synth
    from harness.data.rooms import make_room

    rng = np.random.default_rng([seed, 6])
    room = make_room(rng, size_range=(5.0, 7.0))
    for sub in ("depth", "pose", "intrinsic"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    k4 = np.eye(4)
    k4[:3, :3] = K_DEPTH
    np.savetxt(root / "intrinsic" / "intrinsic_depth.txt", k4, fmt="%.6f")
    for i, pose in enumerate(track(scan_poses(room, rng, frames), description="rendering the bench scene",
                                   transient=True)):
        depth, _, _ = synth.render_rgbd(room.scene, K_DEPTH, pose, 640, 480)
        write_depth_png(root / "depth" / f"{i * 10}.png", depth)
        np.savetxt(root / "pose" / f"{i * 10}.txt", pose, fmt="%.9f")


def scene_refs(root: Path) -> List[FrameRef]:
    ids = sorted(int(p.stem) for p in (root / "pose").glob("*.txt"))
    return [FrameRef("bench", i, root / "color" / f"{i}.jpg", root / "depth" / f"{i}.png", root / "pose" / f"{i}.txt",
                     K_DEPTH, K_DEPTH) for i in ids]


def kdtree_overlap(a: np.ndarray, b: np.ndarray, radius: float) -> float:
    from scipy.spatial import cKDTree

    d, _ = cKDTree(b).query(a, k=1, distance_upper_bound=radius)
    return float(np.mean(np.isfinite(d)))


def run(frames: int, seed: int, repeats: int, cache: Path, out: Path) -> Dict[str, Any]:
    root = ensure_generated(cache / f"bench-pairs-scene-s{seed}-f{frames}", {"bench": "pairs", "version": SCENE_VERSION,
                                                                                  "frames": frames, "seed": seed},
                            lambda tmp: generate_scene(tmp, frames, seed))
    refs = scene_refs(root)
    load = os.getloadavg()
    rows = []
    for voxel in (0.05, 0.025):
        cfg = PairsConfig(voxel_size=voxel)
        times, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            res = mine_pairs("bench", refs, cfg)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        rows.append({"voxel": voxel, "times": times, "cpu": cpu, "result": res})
        log.info("bench.pairs voxel=%s seconds=%s pairs=%d", voxel, [round(x, 2) for x in times], len(res.pairs))

    # the per-pair KD-tree baseline on a sample of directed pairs, at 5 cm
    voxel = 0.05
    rng = np.random.default_rng(0)
    geo = [_frame_geometry(r) for r in refs]
    centres = [(unpack_keys(voxel_keys(world_points(d, K, p), voxel)) + 0.5) * voxel for d, K, p in geo]
    res = rows[0]["result"]
    from baselines.pairs import overlap_matrix

    O = overlap_matrix([voxel_keys(c, voxel) for c in centres], 1.5)
    sample = [tuple(rng.choice(len(refs), 2, replace=False)) for _ in range(40)]
    t = time.perf_counter()
    kd = [kdtree_overlap(centres[a], centres[b], 1.5 * voxel) for a, b in sample]
    kd_time = (time.perf_counter() - t) / len(sample)
    max_diff = max(abs(k - O[a, b]) for k, (a, b) in zip(kd, sample))
    n_dir = len(refs) * (len(refs) - 1)

    lines = [
        "# Frame-pair mining benchmark",
        "",
        f"Scene: synthetic ScanNet-size room ({len(refs)} frames of 640x480 depth, ScanNet depth intrinsics, "
        f"camera loop looking across a 5-7 m room; `bench/pairs.py`, seed {seed}).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible "
        f"(shared with other jobs; timings are noisy), Python {platform.python_version()}; load average "
        f"{load[0]:.1f} before and {os.getloadavg()[0]:.1f} after the runs (runnable processes per 2 cores: "
        f"a wall time above the CPU time is time spent waiting for a core).",
        "Timed: `baselines.pairs.mine_pairs` = read depth PNGs + poses from disk, back-project, voxelise in world "
        "coordinates, overlap of all pairs (spatial hash, 1.5 x voxel), keep max(overlap) >= 0.3.",
        "",
        f"Threads: {PairsConfig().workers or 'min(4, CPUs)'} loader threads (`pairs.workers`); CPU = process time "
        "summed over threads (about the wall time on one idle core).",
        "",
        "| voxel | wall, runs (s) | wall, median (s) | CPU, median (s) | frames | voxels/frame (mean) | pairs kept | "
        "target (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = r["result"]
        med = statistics.median(r["times"])
        lines.append(f"| {r['voxel']} m | {', '.join(f'{x:.2f}' for x in r['times'])} | {med:.2f} | "
                     f"{statistics.median(r['cpu']):.2f} | {len(res.frames)} | "
                     f"{int(np.mean(res.voxels))} | {len(res.pairs)} of {len(res.frames) * (len(res.frames) - 1) // 2} | "
                     f"{'<= 10 s: met' if med <= 10 else '<= 10 s: MISSED'} |")
    lines += [
        "",
        f"Per-pair KD-tree baseline (scipy cKDTree per directed pair, on voxel centres at 5 cm, as the public "
        f"scripts do with Open3D): {kd_time * 1000:.1f} ms per directed pair on a sample of {len(sample)}, i.e. about "
        f"{kd_time * n_dir:.0f} s for the {n_dir} directed pairs of this scene, excluding loading. "
        f"Largest difference between its overlaps and the spatial hash's on the sample: {max_diff:.2e}.",
        "",
        "Regenerate: `make bench` (or `python -m bench.pairs`).",
        "",
    ]
    atomic_write_text(out, "\n".join(lines))
    return {"rows": rows, "kd_time": kd_time}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("HARNESS_CACHE", ".cache")))
    ap.add_argument("--out", type=Path, default=Path("reports/bench/pairs.md"))
    args = ap.parse_args()
    run(args.frames, args.seed, args.repeats, args.cache, args.out)
    log.info("bench.pairs report=%s", args.out)


if __name__ == "__main__":
    main()
