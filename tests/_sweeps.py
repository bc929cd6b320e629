"""Helpers of the end-to-end sweep tests: tiny sizes, the CLI in this process, results, the
example plugin as a second real method, and the SLURM cluster probe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "tests" / "sweeps" / "tiny.yaml"
EXAMPLE = REPO / "examples" / "colorization_plugin"
PARTITION = os.environ.get("HARNESS_SLURM_PARTITION", "debug")

# A few seconds per job on one CPU: the small embedded ScanNet of the `small_scannet` fixture
# (same sizes and cache, so it is generated once), one training scene cropped to 3000 points,
# a narrow backbone.
COLORIZATION = "{steps: 8, batch_size: 1, max_points: 3000, max_scenes: 1, voxel_size: 0.05}"


def tiny(out: Path, cache: Path, steps: int = 6) -> List[str]:
    from .data_helpers import SMALL_SCANNET

    return [f"output_dir={out}", f"datasets.scannet.cache_dir={cache}",
            *(f"datasets.scannet.{k}={str(v).replace(' ', '')}" for k, v in SMALL_SCANNET.items()),
            f"tasks.semseg.steps={steps}", "tasks.semseg.batch_size=1", "tasks.semseg.voxel_size=0.05",
            "tasks.semseg.augment.max_points=3000", "tasks.semseg.max_train_scenes=1", "tasks.semseg.max_eval_scenes=1",
            "backbone.planes=[8,8,16,16,16,16,8,8]", "trainer.log_every=1"]


def local_args() -> List[str]:
    """In this process, one torch thread (as the SLURM jobs with cpus_per_task=1)."""
    return ["launcher.local.executor=debug", "launcher.local.cpus=1"]


def slurm_args(poll_s: float = 1.0) -> List[str]:
    return [f"launcher.slurm.partition={PARTITION}", "launcher.slurm.gpus_per_node=0",
            "launcher.slurm.cpus_per_task=1", "launcher.slurm.mem_gb=2",
            # >= 13 min: submitit counts a signal before 80% / (limit - 10 min) as a time-out
            "launcher.slurm.timeout_min=30", f"launcher.slurm.poll_s={poll_s}"]


def cli(*args: object) -> tuple:
    """(exit status, stdout, stderr) of `harness ARGS` run in this process."""
    import contextlib
    import io

    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def result(run: Path, kind: str, job_id: str) -> Optional[Dict]:
    path = run / ("pretrain" if kind == "pretrain" else "cells") / job_id / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def records(run: Path) -> Dict[str, Dict]:
    path = run / "slurm" / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def install_plugin(site: Path, monkeypatch) -> None:
    """What `pip install -e examples/colorization_plugin` leaves, for this process and for jobs
    started from it (SLURM exports PYTHONPATH): the package and a dist-info with its entry
    point on the path."""
    dist = site / "harness_colorization-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-colorization\nVersion: 0.1.0\n")
    import tomllib

    eps = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]["harness.methods"]
    (dist / "entry_points.txt").write_text("[harness.methods]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    paths = [str(REPO), str(EXAMPLE), str(site)]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for p in reversed(paths):
        monkeypatch.syspath_prepend(p)


def slurm_problem() -> Optional[str]:
    """None if a SLURM cluster answers and PARTITION has a usable node, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools (sinfo/sbatch) not found; run `make slurm-up` (scripts/slurm_local.sh up)"
    timeout_s = float(os.environ.get("HARNESS_SLURM_PROBE_TIMEOUT_S", "4"))
    try:
        out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"sinfo got no answer from slurmctld within {timeout_s:g}s; run `make slurm-up`"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()}); run `make slurm-up`"
    states = out.stdout.split()
    if not states:
        return f"partition {PARTITION!r} not found (set HARNESS_SLURM_PARTITION)"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable node in partition {PARTITION!r} (states: {states})"
    return None


def squeue_ids() -> List[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()
