"""Rich views of a sweep before and while it runs: the job plan (--dry-run) and each cell's state
(--status) read from the store (and the scheduler where one answers)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from rich.table import Table

from harness.store import DONE, FAILED, Store
from harness.sweep import PRETRAIN, Plan


def job_state(store: Store, spec: Any, queue: Optional[Dict[str, str]] = None) -> str:
    r = store.read(spec.kind, spec.id)
    if r is not None and r.get("unreadable"):
        return f"failed: {r['error']}"
    if r is not None and r.get("config_hash") == spec.config_hash:
        if r.get("status") == DONE:
            return "done"
        if r.get("status") == FAILED:
            return f"failed: {r.get('error')}"
    if queue and spec.id in queue:
        return queue[spec.id]
    if r is not None and r.get("config_hash") != spec.config_hash:
        return "stale (config changed)"
    ckpt = spec.workdir / "ckpt"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "started (checkpoint present)"
    return "pending"


def print_plan(plan: Plan, store: Store, sweep: Any, console: Any,
               resources: Optional[Dict[str, Dict[str, str]]] = None, notes: Sequence[str] = ()) -> None:
    """The job plan. ``resources``: the launcher's extra columns per job to submit (SLURM: how it
    is submitted, resources, time limit, dependency); ``notes``: summary lines (GPU-hours)."""
    t = Table(title=f"Plan of sweep {plan.sweep} -> {store.root}")
    extra: List[str] = []
    for row in (resources or {}).values():
        extra += [k for k in row if k not in extra]
    cols = ["job", "kind", "method", "dataset / task", "seed"] + (extra or ["depends on"]) + ["state"]
    for col in cols:
        t.add_column(col, no_wrap=col == "job")
    for j in plan.jobs:
        what = j.dataset if j.kind == PRETRAIN else f"{j.dataset} / {j.task}"
        if extra:
            cells = [(resources or {}).get(j.id, {}).get(k, "—") for k in extra]
        else:
            cells = ["" if j.kind == PRETRAIN else (j.pretrain_id + (" (inline)" if j.inline_pretrain else ""))]
        t.add_row(j.id, j.kind, j.method, what, str(j.seed), *cells, job_state(store, j))
    console.print(t)
    console.print(f"{len(plan.pretrain)} pre-training jobs, {len(plan.finetune)} fine-tuning jobs, "
                  f"launcher {sweep.cfg.launcher.name}")
    for line in notes:
        console.print(line, highlight=False)


def print_status(plan: Plan, store: Store, sweep: Any, console: Any, queue: Optional[Dict[str, str]] = None) -> None:
    t = Table(title=f"Status of sweep {plan.sweep} ({store.root})")
    for col in ("job", "kind", "state"):
        t.add_column(col)
    counts: Dict[str, int] = {}
    for j in plan.jobs:
        state = job_state(store, j, queue)
        key = state.split(":")[0].split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
        style = "green" if state == "done" else "red" if state.startswith("failed") else ""
        t.add_row(j.id, j.kind, f"[{style}]{state}[/{style}]" if style else state)
    console.print(t)
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
