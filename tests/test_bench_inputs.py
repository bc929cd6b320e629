"""The backbone benchmark's inputs (partial scans of synthetic rooms, batches of real ScanNet meshes) and report."""

from __future__ import annotations

import json

import numpy as np

from bench import backbone
from bench.backbone import scan_batch, scan_files
from harness.backbones.synthetic import partial_scan
from tests.data_helpers import sample


def test_partial_scan_keeps_one_side_of_a_vertical_plane_in_order():
    vox = np.zeros((10, 3), dtype=np.int32)
    vox[:, 0] = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]  # sites on a line along x
    for seed in range(6):
        keep = partial_scan(vox, 4, np.random.default_rng(seed))
        assert list(keep) == sorted(keep)
        # whatever the plane's direction, the kept sites are the 4 at one end of the line
        assert set(vox[keep, 0].tolist()) in ({0, 1, 2, 3}, {6, 7, 8, 9})
    assert list(partial_scan(vox, 10, np.random.default_rng(0))) == list(range(10))
    assert list(partial_scan(vox, 12, np.random.default_rng(0))) == list(range(10))


def _neighbours_per_site(coords: np.ndarray) -> float:
    """Occupied sites in each site's 3x3x3 block (itself included), averaged; by set lookups."""
    occupied = set(map(tuple, coords.tolist()))
    hits = 0
    for d in np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3):
        hits += sum(t in occupied for t in map(tuple, (coords + np.concatenate([[0], d])).tolist()))
    return hits / len(coords)


def test_scan_batch_of_the_real_scene():
    root = sample("scannet", "scans", "scene0470_00", "scene0470_00_vh_clean_2.ply").parents[2]
    files = scan_files(root)
    coords, feats = scan_batch(60000, files, seed=0)
    assert coords.shape == (60000, 4) and coords.dtype == np.int32
    assert feats.shape == (60000, 3) and feats.dtype == np.float32
    assert feats.min() >= -0.5 and feats.max() <= 0.5
    items = np.unique(coords[:, 0])
    assert items.tolist() == [0, 1]  # the scene has 67,465 vertices: one copy gives fewer than 60k voxels
    assert len(np.unique(coords, axis=0)) == len(coords)
    first = coords[coords[:, 0] == 0]
    assert len(first) < 67465
    # mesh vertices at 2 cm leave holes in the surface: about 8-9 sites per 3x3x3 block (the
    # unturned scene: 8.2), against 11 for densely sampled surfaces
    assert 7.5 < _neighbours_per_site(first) < 10.0


def test_timing_rounds_follow_repeats_then_the_time_budget():
    """At least ``repeats`` timed rounds after the warm-up; more only while the budget lasts,
    never more than ``max_repeats``."""
    from bench.backbone import make_input, time_backends

    coords, feats = make_input(400)
    counts = {}
    for key, kw in {"no budget": dict(repeats=2), "budget": dict(repeats=1, budget_s=1e9, max_repeats=3),
                    "budget below repeats": dict(repeats=2, budget_s=1e9, max_repeats=1)}.items():
        times = time_backends(["torch"], coords, feats, "cpu", warmup=1, **kw)
        counts[key] = len(times["torch"])
    assert counts == {"no budget": 2, "budget": 3, "budget below repeats": 2}


def _results(torch_times, me_times):
    env = {"cpu": "test CPU", "threads": 2, "ncpu": 2, "device": "cpu", "torch": "x", "minkowski": "0.5.4",
           "date": "2026-11-27 00:00", "peak_fp32": 100.0, "peak_bf16": 200.0}
    row = {"sites": 1000, "neighbours": 9.0, "flops": {"step_gflop": 10.0, "executed_step_gflop": 11.0},
           "times": {"torch": torch_times, "minkowski": me_times}, "memory": {}, "gemm_s": None, "issued": {}}
    return {"command": "python bench/backbone.py", "env": env, "rows": [row], "padding": {}, "other_cores": 0.0}


def test_report_gives_the_per_pair_median_with_its_order_statistic_interval(tmp_path):
    # ME / torch per pair: 1.5, 1.6, ..., 2.5 in a shuffled order; for 11 pairs the 95% interval
    # of the median runs from the 2nd to the 10th smallest ratio (coverage 1 - 24/2048)
    ratios = [1.9, 1.5, 2.3, 1.6, 2.0, 2.5, 1.7, 2.2, 1.8, 2.4, 2.1]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_results([2.0] * 11, [2.0 * r for r in ratios])))
    assert backbone.main(["--render", str(path)]) == 0
    line = next(s for s in (tmp_path / "run.md").read_text().splitlines() if s.startswith("| 1000 |") and "| torch |" in s)
    assert "| 2.00x [1.60-2.40] (1.50-2.50) |" in line
    # three pairs cannot cover 95%: the full range, with its coverage 1 - 2/8
    path.write_text(json.dumps(_results([1.0] * 3, [2.0, 1.8, 2.2])))
    backbone.main(["--render", str(path)])
    assert "| 2.00x [1.80-2.20 at 75%] (1.80-2.20) |" in (tmp_path / "run.md").read_text()
