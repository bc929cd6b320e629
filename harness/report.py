"""Table 1 from the results store: the paper's layout, deltas against Scratch, best per group.

Reads ``runs/<sweep>/`` (never trains). Column groups follow the sweep's column order grouped by
dataset (S3DIS, ScanNet, KITTI, SUN RGB-D in the paper); row groups are Scratch / Multi-scan /
Single-scan from each method's registered group. Each cell is the metric in percent (mean over
seeds) with its delta against Scratch; the best of each row group is bold; a cell without a
result shows a dash and the reason is listed under the table (not run yet / failed, with the log
path). Outputs: the rich console table, ``table1.md`` and ``table1.csv`` (pandas) in the run's
``report/`` directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

from harness.api import GROUPS
from harness.registry import METHODS
from harness.store import DONE, FAILED, Store

DATASET_NAMES = {"s3dis": "S3DIS", "scannet": "ScanNet", "semantickitti": "KITTI", "sunrgbd": "SUN RGB-D"}
TASK_NAMES = {"semseg": "Semantic", "instseg": "Instance", "detection": "Object"}
METRIC_NAMES = {"miou": "mIoU", "ap50": "AP@0.5", "map50": "mAP@0.5"}
BASELINE = "scratch"


@dataclass
class Column:
    id: str
    dataset: str
    task: str

    @property
    def group(self) -> str:
        return DATASET_NAMES.get(self.dataset, self.dataset)

    @property
    def label(self) -> str:
        return TASK_NAMES.get(self.task, self.task)


@dataclass
class Table:
    """Table 1 as data: the renderers below only format it."""

    sweep: str
    columns: List[Column]
    methods: List[str]
    groups: Dict[str, str]  # method -> row group
    mean: pd.DataFrame  # method x column, percent
    std: pd.DataFrame
    n: pd.DataFrame
    delta: pd.DataFrame  # against Scratch
    best: pd.DataFrame  # bool
    missing: List[Tuple[str, str, str]] = field(default_factory=list)  # (method, column, reason)
    metrics: Dict[str, str] = field(default_factory=dict)  # column -> metric name
    results: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per stored job result


def method_group(name: str) -> str:
    try:
        return METHODS.get(name).group
    except Exception:  # noqa: BLE001 - an unknown plugin still shows, in its own group
        return "Other"


def build_table(run_dir: Path, plan: Optional[Dict[str, Any]] = None) -> Table:
    store = Store(Path(run_dir))
    plan = plan or store.read_plan()
    if plan is None:
        raise FileNotFoundError(f"{run_dir}: no plan.json; is this a sweep run directory (runs/<sweep>)?")
    jobs = {j["id"]: j for j in plan["jobs"]}
    cols, seen = [], set()
    for j in plan["jobs"]:
        if j["kind"] == "finetune" and j["column"] not in seen:
            seen.add(j["column"])
            cols.append(Column(j["column"], j["dataset"], j["task"]))
    # group columns by dataset, keeping the sweep's order of first appearance
    order = list(dict.fromkeys(c.dataset for c in cols))
    cols.sort(key=lambda c: order.index(c.dataset))
    methods = list(plan["methods"])
    groups = {m: plan.get("groups", {}).get(m) or method_group(m) for m in methods}
    rank = {g: i for i, g in enumerate(GROUPS)}
    methods.sort(key=lambda m: (rank.get(groups[m], len(GROUPS)), plan["methods"].index(m)))

    rows = []
    missing: List[Tuple[str, str, str]] = []
    for j in jobs.values():
        if j["kind"] != "finetune":
            continue
        r = store.read("finetune", j["id"])
        current = r is not None and r.get("config_hash") == j["config_hash"]
        if current and r.get("status") == DONE:
            rows.append({"method": j["method"], "column": j["column"], "seed": j["seed"], "metric": r["metric"],
                         "value": 100.0 * float(r["value"]), "wall_seconds": r.get("wall_seconds")})
        elif current and r.get("status") == FAILED:
            log = f" (log: {r['log']})" if r.get("log") else ""
            missing.append((j["method"], j["column"], f"failed: {r.get('error')}{log}"))
        else:
            missing.append((j["method"], j["column"], "not run yet" if r is None else "stale result (config changed)"))
    results = pd.DataFrame(rows, columns=["method", "column", "seed", "metric", "value", "wall_seconds"])
    col_ids = [c.id for c in cols]
    grouped = results.groupby(["method", "column"])["value"]
    mean = grouped.mean().unstack().reindex(index=methods, columns=col_ids) if len(results) else \
        pd.DataFrame(index=methods, columns=col_ids, dtype=float)
    std = grouped.std(ddof=1).unstack().reindex(index=methods, columns=col_ids) if len(results) else mean * math.nan
    n = grouped.count().unstack().reindex(index=methods, columns=col_ids).fillna(0).astype(int) if len(results) else \
        pd.DataFrame(0, index=methods, columns=col_ids)
    mean = mean.astype(float)
    base = mean.loc[BASELINE] if BASELINE in mean.index else pd.Series(math.nan, index=col_ids)
    delta = mean.sub(base, axis=1)
    best = pd.DataFrame(False, index=methods, columns=col_ids)
    for g in set(groups.values()):
        members = [m for m in methods if groups[m] == g]
        if g == "Scratch" or len(members) < 1:
            continue
        block = mean.loc[members]
        for c in col_ids:
            col = block[c].dropna()
            if len(col):
                best.loc[col[col == col.max()].index, c] = True
    metrics = {}
    for j in jobs.values():
        if j["kind"] == "finetune":
            r = store.read("finetune", j["id"])
            if r and r.get("metric"):
                metrics[j["column"]] = r["metric"]
    missing.sort(key=lambda t: (methods.index(t[0]) if t[0] in methods else 99, col_ids.index(t[1])))
    return Table(plan["sweep"], cols, methods, groups, mean, std, n, delta, best, missing, metrics, results)


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _fmt_delta(d: float) -> str:
    return "" if d is None or math.isnan(d) else f" ({d:+.1f})"


def render_rich(table: Table) -> Any:
    from rich.table import Table as RTable
    from rich.text import Text

    t = RTable(title=f"Table 1 — {table.sweep}", show_lines=False, header_style="bold")
    t.add_column("Group")
    t.add_column("Pre-training")
    for c in table.columns:
        t.add_column(f"{c.group}\n{c.label}", justify="right")
    last_group = None
    for m in table.methods:
        g = table.groups[m]
        if last_group is not None and g != last_group:
            t.add_section()
        cells = []
        for c in table.columns:
            v = table.mean.loc[m, c.id]
            if math.isnan(v):
                cells.append(Text("—", style="dim"))
                continue
            text = Text(_fmt(v), style="bold" if table.best.loc[m, c.id] else "")
            d = table.delta.loc[m, c.id]
            if m != BASELINE and not math.isnan(d):
                text.append(_fmt_delta(d), style="green" if d > 0 else "red" if d < 0 else "")
            cells.append(text)
        t.add_row(g if g != last_group else "", m, *cells)
        last_group = g
    return t


def render_markdown(table: Table) -> str:
    head = ["Group", "Pre-training"] + [f"{c.group} {c.label}" for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = None
    for m in table.methods:
        g = table.groups[m]
        cells = []
        for c in table.columns:
            v = table.mean.loc[m, c.id]
            if math.isnan(v):
                cells.append("—")
                continue
            s = _fmt(v) + ("" if m == BASELINE else _fmt_delta(table.delta.loc[m, c.id]))
            cells.append(f"**{s}**" if table.best.loc[m, c.id] else s)
        lines.append("| " + " | ".join([g if g != last else "", m] + cells) + " |")
        last = g
    out = [f"# Table 1 — {table.sweep}", "", *lines, ""]
    metrics = sorted({METRIC_NAMES.get(v, v) for v in table.metrics.values()})
    if metrics:
        out.append(f"Values in percent ({', '.join(metrics)}); deltas against Scratch; bold = best of its group.")
        out.append("")
    if table.missing:
        out.append("Missing cells:")
        out += [f"- {m} / {c}: {why}" for m, c, why in table.missing]
        out.append("")
    return "\n".join(out)


def to_csv_frame(table: Table) -> pd.DataFrame:
    rows = []
    for m in table.methods:
        row: Dict[str, Any] = {"group": table.groups[m], "method": m}
        for c in table.columns:
            row[c.id] = table.mean.loc[m, c.id]
            row[f"{c.id}_delta"] = table.delta.loc[m, c.id]
            row[f"{c.id}_n"] = int(table.n.loc[m, c.id])
        rows.append(row)
    return pd.DataFrame(rows)


def write_report(table: Table, out_dir: Path) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "table1.md", "csv": out_dir / "table1.csv"}
    paths["md"].write_text(render_markdown(table))
    to_csv_frame(table).to_csv(paths["csv"], index=False, float_format="%.2f")
    return paths


def print_report(table: Table, console: Any) -> None:
    console.print(render_rich(table))
    if table.missing:
        console.print("[bold]Missing cells[/bold]")
        for m, c, why in table.missing:
            console.print(f"  [dim]—[/dim] {m} / {c}: {why}", highlight=False)
