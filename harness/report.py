"""Table 1 from the results store: the paper's layout, seeds, significance, published numbers.

Reads ``runs/<sweep>/`` (never trains). Column groups follow the sweep's column order grouped by
dataset (S3DIS, ScanNet, KITTI, SUN RGB-D in the paper); row groups are Scratch / Multi-scan /
Single-scan from each method's registered group. Each cell is the metric in percent: the mean
over seeds +- the sample std (n seeds), its delta against Scratch marked ``*`` when a paired
t-test over seeds finds it significant at ``report.alpha``, and bold when it is the best of its
row group and not tied with another member within noise (rules and their reasons:
``harness/reporting/stats.py``). A cell without a result shows a dash and the reason is listed
under the table (not run yet, running, failed with the log path, pre-training failed, stale).

One ``Table`` (data, from ``build_table``) and several renderers that only format it: the rich
console table, Markdown, CSV (here), LaTeX (``harness.reporting.latex``), a self-contained HTML
page (``harness.reporting.html``) and PNG plots (``harness.reporting.plots``). Every renderer
formats a cell through ``cell_view`` and writes the same legend (``legend``), so the formats
cannot disagree. ``write_report`` writes the requested formats to ``runs/<sweep>/report/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from harness.api import GROUPS
from harness.registry import METHODS
from harness.reporting.stats import best_of_group, holm, mean_std, paired_test
from harness.store import DONE, FAILED, Store

log = logging.getLogger(__name__)

DATASET_NAMES = {"s3dis": "S3DIS", "scannet": "ScanNet", "semantickitti": "KITTI", "sunrgbd": "SUN RGB-D"}
TASK_NAMES = {"semseg": "Semantic", "instseg": "Instance", "detection": "Object"}
METRIC_NAMES = {"miou": "mIoU", "ap50": "AP@0.5", "map50": "mAP@0.5"}
# Names as the paper prints them (LaTeX, HTML, plots); the console, Markdown and CSV keep the
# registered names, which are what a user types.
METHOD_TITLES = {"scratch": "Scratch", "pointcontrast": "PointContrast", "csc": "CSC",
                 "depthcontrast": "DepthContrast", "image_guided": "Image-guided"}
BASELINE = "scratch"
FORMATS = ("md", "csv", "tex", "html", "png")
SIG_MARK = "*"


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
class ReportSettings:
    """The sweep's ``report:`` block as the report uses it (``harness.config.ReportConfig``)."""

    alpha: float = 0.05
    correction: str = "none"
    digits: int = 1

    @classmethod
    def from_mapping(cls, cfg: Optional[Dict[str, Any]]) -> "ReportSettings":
        cfg = cfg or {}
        return cls(float(cfg.get("alpha", 0.05)), str(cfg.get("correction", "none")), int(cfg.get("digits", 1)))


@dataclass
class Table:
    """Table 1 as data: the renderers only format it. Frames are method x column, in percent."""

    sweep: str
    columns: List[Column]
    methods: List[str]
    groups: Dict[str, str]  # method -> row group
    mean: pd.DataFrame
    std: pd.DataFrame  # sample std over seeds (nan for one seed)
    n: pd.DataFrame  # seeds with a result
    delta: pd.DataFrame  # mean - mean of Scratch
    best: pd.DataFrame  # bool: bold (best of its group, not tied within noise)
    missing: List[Tuple[str, str, str]] = field(default_factory=list)  # (method, column, reason)
    metrics: Dict[str, str] = field(default_factory=dict)  # column -> metric name
    results: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per stored job result
    # Paired test of each delta against Scratch over seeds (nan where n_pairs < 2).
    p: pd.DataFrame = field(default_factory=pd.DataFrame)  # p-value (Holm-adjusted with correction=holm)
    t: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    ci_low: pd.DataFrame = field(default_factory=pd.DataFrame)  # (1 - alpha) interval of the delta
    ci_high: pd.DataFrame = field(default_factory=pd.DataFrame)
    significant: pd.DataFrame = field(default_factory=pd.DataFrame)  # bool: p < alpha
    settings: ReportSettings = field(default_factory=ReportSettings)
    seeds: List[int] = field(default_factory=list)  # the sweep's seeds
    cells_planned: int = 0
    run_dir: Optional[Path] = None
    # Published values (percent) aligned to this table, from harness.reporting.published.
    published: Optional[pd.DataFrame] = None
    published_source: str = ""
    # Row -> the registered method it runs (a row named otherwise, e.g. csc_long: {method: csc}).
    method_of: Dict[str, str] = field(default_factory=dict)

    @property
    def n_max(self) -> int:
        return int(self.n.values.max()) if self.n.size else 0

    @property
    def cells_done(self) -> int:
        return int((self.n > 0).values.sum())

    def values(self, method: str, column: str) -> Dict[int, float]:
        """seed -> value (percent) of one cell."""
        r = self.results
        if not len(r):
            return {}
        sel = r[(r["method"] == method) & (r["column"] == column)]
        return {int(s): float(v) for s, v in zip(sel["seed"], sel["value"])}


def method_group(name: str) -> str:
    try:
        return METHODS.get(name).group
    except Exception:  # noqa: BLE001 - an unknown plugin still shows, in its own group
        return "Other"


def method_title(name: str) -> str:
    return METHOD_TITLES.get(name, name)


# ----------------------------------------------------------------------------------------------
# Building the table


def _last_step(path: Path) -> Optional[int]:
    try:
        lines = path.read_text().strip().splitlines()
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError, IndexError):
        return None


def _why_missing(store: Store, job: Dict[str, Any], result: Optional[Dict[str, Any]],
                 jobs: Dict[str, Dict[str, Any]]) -> str:
    """Why a cell has no current result, as precisely as the store can tell."""
    if result is not None and result.get("unreadable"):
        return f"failed: {result['error']}"
    if result is not None and result.get("config_hash") == job["config_hash"] and result.get("status") == FAILED:
        log_path = f" (log: {result['log']})" if result.get("log") else ""
        return f"failed: {result.get('error')}{log_path}"
    if result is not None and result.get("config_hash") != job["config_hash"]:
        return "stale result (config changed)"
    pre_id = job.get("pretrain_id")
    if pre_id and pre_id in jobs and not job.get("inline_pretrain"):
        pre = store.read("pretrain", pre_id)
        if pre is not None and pre.get("config_hash") == jobs[pre_id]["config_hash"] and pre.get("status") == FAILED:
            log_path = f" (log: {pre['log']})" if pre.get("log") else ""
            return f"pre-training {pre_id} failed: {pre.get('error')}{log_path}"
        if pre is None or pre.get("status") != DONE or pre.get("config_hash") != jobs[pre_id]["config_hash"]:
            logs = sorted(store.job_dir("pretrain", pre_id).glob("metrics-*.jsonl"), key=lambda q: q.stat().st_mtime)
            step = _last_step(logs[-1]) if logs else None
            state = f", running or interrupted at step {step}" if step is not None else ""
            return f"not run yet (waits for pre-training {pre_id}{state})"
    metrics_log = store.job_dir("finetune", job["id"]) / "metrics-finetune.jsonl"
    if metrics_log.is_file():
        step = _last_step(metrics_log)
        total = (job.get("task_cfg") or {}).get("steps")
        where = f" at step {step}" + (f"/{total}" if total else "") if step is not None else ""
        return f"running or interrupted{where} (no result yet)"
    return "not run yet"


def _frame(methods: Sequence[str], cols: Sequence[str], fill: Any = math.nan, dtype: Any = float) -> pd.DataFrame:
    return pd.DataFrame(fill, index=list(methods), columns=list(cols), dtype=dtype)


def build_table(run_dir: Path, plan: Optional[Dict[str, Any]] = None, settings: Optional[ReportSettings] = None,
                compare: Optional[str] = None) -> Table:
    """Table 1 of ``run_dir`` (``runs/<sweep>``); ``settings`` default to the sweep's ``report:``
    block recorded in plan.json; ``compare`` = ``published`` or a CSV path adds published values."""
    store = Store(Path(run_dir))
    plan = plan or store.read_plan()
    if plan is None:
        raise FileNotFoundError(f"{run_dir}: no plan.json; is this a sweep run directory (runs/<sweep>)?")
    settings = settings or ReportSettings.from_mapping(plan.get("report"))
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
    col_ids = [c.id for c in cols]

    rows = []
    missing: List[Tuple[str, str, str]] = []
    absent: Dict[Tuple[str, str, str], List[int]] = {}  # (method, column, reason) -> seeds
    metrics: Dict[str, str] = {}
    planned = 0
    for j in jobs.values():
        if j["kind"] != "finetune":
            continue
        planned += 1
        r = store.read("finetune", j["id"])
        if r and r.get("metric"):
            metrics.setdefault(j["column"], r["metric"])
        if r is not None and r.get("config_hash") == j["config_hash"] and r.get("status") == DONE:
            rows.append({"method": j["method"], "column": j["column"], "seed": j["seed"], "metric": r["metric"],
                         "value": 100.0 * float(r["value"]), "wall_seconds": r.get("wall_seconds")})
        else:
            absent.setdefault((j["method"], j["column"], _why_missing(store, j, r, jobs)), []).append(j["seed"])
    several = len(plan.get("seeds") or []) > 1
    for (m, c, why), seeds in absent.items():
        label = f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in sorted(seeds))})" if several else ""
        missing.append((m, c, why + label))
    results = pd.DataFrame(rows, columns=["method", "column", "seed", "metric", "value", "wall_seconds"])

    mean, std = _frame(methods, col_ids), _frame(methods, col_ids)
    n = _frame(methods, col_ids, 0, int)
    values: Dict[Tuple[str, str], Dict[int, float]] = {}
    for (m, c), sel in results.groupby(["method", "column"]):
        if m not in mean.index or c not in mean.columns:
            continue
        values[(m, c)] = {int(s): float(v) for s, v in zip(sel["seed"], sel["value"])}
        mean.loc[m, c], std.loc[m, c], n.loc[m, c] = mean_std(values[(m, c)].values())

    base = mean.loc[BASELINE] if BASELINE in mean.index else pd.Series(math.nan, index=col_ids)
    delta = mean.sub(base, axis=1)

    # Paired tests of every delta against Scratch.
    p, t = _frame(methods, col_ids), _frame(methods, col_ids)
    lo, hi = _frame(methods, col_ids), _frame(methods, col_ids)
    n_pairs = _frame(methods, col_ids, 0, int)
    keys: List[Tuple[str, str]] = []
    raw: List[float] = []
    for m in methods:
        if m == BASELINE:
            continue
        for c in col_ids:
            if (m, c) not in values or (BASELINE, c) not in values:
                continue
            if set(values[(m, c)]) != set(values[(BASELINE, c)]):
                # The delta printed compares means over different seeds; a test over the common
                # seeds would judge another difference (it may even have the other sign).
                n_pairs.loc[m, c] = len(set(values[(m, c)]) & set(values[(BASELINE, c)]))
                continue
            test = paired_test(values[(m, c)], values[(BASELINE, c)], settings.alpha)
            n_pairs.loc[m, c] = test.n
            t.loc[m, c], lo.loc[m, c], hi.loc[m, c] = test.t, test.ci_low, test.ci_high
            keys.append((m, c))
            raw.append(test.p)
    adjusted = holm(raw) if settings.correction == "holm" else raw
    for (m, c), pv in zip(keys, adjusted):
        p.loc[m, c] = pv
    significant = (p < settings.alpha) & p.notna()

    best = _frame(methods, col_ids, False, bool)
    for g in dict.fromkeys(groups.values()):
        members = [m for m in methods if groups[m] == g]
        if g == "Scratch":
            continue
        for c in col_ids:
            bold = best_of_group({m: values.get((m, c), {}) for m in members}, settings.alpha)
            for m, b in bold.items():
                best.loc[m, c] = b

    missing.sort(key=lambda x: (methods.index(x[0]) if x[0] in methods else 99,
                                col_ids.index(x[1]) if x[1] in col_ids else 99))
    table = Table(plan["sweep"], cols, methods, groups, mean, std, n, delta, best, missing, metrics, results,
                  p=p, t=t, n_pairs=n_pairs, ci_low=lo, ci_high=hi, significant=significant, settings=settings,
                  seeds=list(plan.get("seeds") or []), cells_planned=planned, run_dir=Path(run_dir),
                  method_of={j["method"]: str((j.get("method_cfg") or {}).get("method") or j["method"])
                             for j in plan["jobs"]})
    if compare:
        attach_published(table, compare)
    return table


def attach_published(table: Table, name: str) -> Table:
    """Align published values (``published`` or a CSV path) to the table by method and (dataset, task)."""
    from harness.reporting.published import load_published

    frame, source = load_published(name)
    pub = _frame(table.methods, [c.id for c in table.columns])
    lookup = {(r.method, r.dataset, r.task): float(r.value) for r in frame.itertuples()}
    for m in table.methods:
        for c in table.columns:
            pub.loc[m, c.id] = lookup.get((table.method_of.get(m, m), c.dataset, c.task), math.nan)
    table.published, table.published_source = pub, source
    return table


# ----------------------------------------------------------------------------------------------
# One cell, format-neutral


@dataclass
class CellView:
    """One cell's pieces as plain text; each renderer adds its own markup."""

    value: str = ""  # "" = no result
    std: str = ""  # "" with one seed
    delta: str = ""  # "+1.1"; "" for Scratch or without a Scratch value
    sign: int = 0  # sign of the delta (colour)
    significant: bool = False
    bold: bool = False
    n_note: str = ""  # "n=2" when this cell has fewer seeds than the table's most

    @property
    def empty(self) -> bool:
        return not self.value


def _num(x: float, digits: int, signed: bool = False) -> str:
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def cell_view(table: Table, method: str, column: str) -> CellView:
    v = table.mean.loc[method, column]
    if math.isnan(v):
        return CellView()
    d = table.settings.digits
    n = int(table.n.loc[method, column])
    s = table.std.loc[method, column]
    dv = table.delta.loc[method, column]
    view = CellView(value=_num(v, d), std="" if math.isnan(s) else _num(s, d), bold=bool(table.best.loc[method, column]))
    if method != BASELINE and not math.isnan(dv):
        view.delta = _num(dv, d, signed=True)
        view.sign = int(dv > 0) - int(dv < 0)
        view.significant = bool(table.significant.loc[method, column])
    if n < table.n_max:
        view.n_note = f"n={n}"
    return view


def cell_text(view: CellView, pm: str = " ± ", mark: str = SIG_MARK) -> str:
    """Plain text of a cell: ``66.2 ± 0.3 (+1.1*) n=2``."""
    if view.empty:
        return "—"
    out = view.value + (pm + view.std if view.std else "")
    if view.delta:
        out += f" ({view.delta}{mark if view.significant else ''})"
    return out + (f" {view.n_note}" if view.n_note else "")


def compare_view(table: Table, method: str, column: str) -> Tuple[str, str, str]:
    """(reproduced, published, reproduced - published) as text; "" where a value is missing."""
    assert table.published is not None
    d = table.settings.digits
    ours, pub = table.mean.loc[method, column], table.published.loc[method, column]
    return ("" if math.isnan(ours) else _num(ours, d), "" if math.isnan(pub) else _num(pub, d),
            "" if math.isnan(ours) or math.isnan(pub) else _num(ours - pub, d, signed=True))


def compare_text(table: Table, method: str, column: str) -> str:
    ours, pub, diff = compare_view(table, method, column)
    if not ours and not pub:
        return "—"
    return f"{ours or '—'} / {pub or '—'}" + (f" ({diff})" if diff else "")


def legend(table: Table) -> List[str]:
    """The notes under the table, the same in every format (plain text with ±, α, —)."""
    notes: List[str] = []
    metrics = sorted({METRIC_NAMES.get(v, v) for v in table.metrics.values()})
    nmax = table.n_max
    if nmax == 0:
        return [f"No results yet: 0 of {table.cells_planned} fine-tuning runs have a result; see the list below."]
    seeds = f"mean ± std over {nmax} seeds" if nmax > 1 else "one seed per cell"
    head = f"Values in percent ({', '.join(metrics)}), {seeds}" if metrics else f"Values in percent, {seeds}"
    notes.append(head + "; (+x) delta against Scratch.")
    a = table.settings.alpha
    tested = int(table.p.notna().values.sum()) if table.p.size else 0
    has_base = BASELINE in table.methods and bool(table.n.loc[BASELINE].gt(0).any())
    if not has_base:
        notes.append("No Scratch results: no deltas and no tests.")
    elif tested:
        corr = f", Holm-corrected over {tested} tests" if table.settings.correction == "holm" else ""
        sig = int(table.significant.values.sum())
        notes.append(f"{SIG_MARK} delta significant at α={a:g} (two-sided paired t-test over seeds, Scratch and the "
                     f"method paired by seed{corr}): {sig} of {tested} deltas.")
    elif nmax > 1:
        notes.append("No test: no method shares 2 or more seeds with Scratch in any column.")
    else:
        notes.append("n=1: no test (one seed per cell: a delta cannot be told from seed noise; "
                     "run with seeds=[0,1,2] for paired t-tests).")
    if nmax > 1:
        notes.append(f"Bold: best of its group per column, only where a paired t-test (α={a:g}) separates it "
                     f"from every other member of its group; a tie within noise is not bold.")
    else:
        notes.append("Bold: highest value of its group per column (as in the paper; untested with one seed; "
                     "a tie is bold for nobody).")
    if any(int(x) < nmax for x in table.n.values.ravel() if int(x) > 0):
        notes.append("n=k: a cell with fewer seeds than the others (its delta, over other seeds than Scratch's, "
                     "is not tested).")
    planned = table.cells_planned
    cells = len(table.methods) * len(table.columns)
    if table.missing:
        failed = sum(1 for _, _, why in table.missing if "failed" in why)
        notes.append(f"{len(table.results)} of {planned} fine-tuning runs have a result ({table.cells_done} of "
                     f"{cells} cells); {len(table.missing)} missing ({failed} failed): see the list below.")
    return notes


def comparison_legend(table: Table) -> str:
    return (f"Reproduced / published (reproduced − published), percent. Published: {table.published_source}. "
            "The paper reports single runs.")


# ----------------------------------------------------------------------------------------------
# Console, Markdown, CSV


def _rich_table(table: Table, title: str, row_cells: Callable[[str], List[Any]]) -> Any:
    """The paper's layout in rich: column groups over labels, a section per row group."""
    from rich.table import Table as RTable

    t = RTable(title=title, header_style="bold")
    t.add_column("Group")
    t.add_column("Pre-training")
    for c in table.columns:
        t.add_column(f"{c.group}\n{c.label}", justify="right")
    last = None
    for m in table.methods:
        g = table.groups[m]
        if last is not None and g != last:
            t.add_section()
        t.add_row(g if g != last else "", m, *row_cells(m))
        last = g
    return t


def render_rich(table: Table) -> Any:
    from rich.text import Text

    def cell(m: str, cid: str) -> Any:
        view = cell_view(table, m, cid)
        if view.empty:
            return Text("—", style="dim")
        text = Text(view.value, style="bold" if view.bold else "")
        if view.std:
            text.append(f"±{view.std}", style="dim")
        if view.delta:
            text.append(f" ({view.delta}{SIG_MARK if view.significant else ''})",
                        style="green" if view.sign > 0 else "red" if view.sign < 0 else "")
        if view.n_note:
            text.append(f" {view.n_note}", style="dim")
        return text

    return _rich_table(table, f"Table 1 — {table.sweep}", lambda m: [cell(m, c.id) for c in table.columns])


def render_rich_comparison(table: Table) -> Any:
    return _rich_table(table, f"Reproduced vs published — {table.sweep}",
                       lambda m: [compare_text(table, m, c.id) for c in table.columns])


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def _md_rows(table: Table, cell: Any) -> List[str]:
    head = ["Group", "Pre-training"] + [f"{c.group} {c.label}" for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = None
    for m in table.methods:
        g = table.groups[m]
        lines.append("| " + " | ".join([g if g != last else "", m] + [cell(m, c.id) for c in table.columns]) + " |")
        last = g
    return lines


def _md_cell(table: Table, m: str, c: str) -> str:
    view = cell_view(table, m, c)
    if view.empty:
        return "—"
    s = _md_escape(cell_text(view))
    return f"**{s}**" if view.bold else s


def render_markdown(table: Table, plots: Sequence[str] = ()) -> str:
    out = [f"# Table 1 — {table.sweep}", "", *_md_rows(table, lambda m, c: _md_cell(table, m, c)), ""]
    for note in legend(table):
        out += [_md_escape(note), ""]
    if table.missing:
        out.append("Missing cells:")
        out += [f"- {m} / {c}: {why}" for m, c, why in table.missing]
        out.append("")
    if table.published is not None:
        out += ["## Reproduced vs published", "",
                *_md_rows(table, lambda m, c: compare_text(table, m, c)), "", comparison_legend(table), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


def to_csv_frame(table: Table) -> pd.DataFrame:
    """One row per method: per column the mean, delta, n, std, paired-test p-value, significance, bold."""
    rows = []
    for m in table.methods:
        row: Dict[str, Any] = {"group": table.groups[m], "method": m}
        for c in table.columns:
            row[c.id] = table.mean.loc[m, c.id]
            row[f"{c.id}_delta"] = table.delta.loc[m, c.id]
            row[f"{c.id}_n"] = int(table.n.loc[m, c.id])
            row[f"{c.id}_std"] = table.std.loc[m, c.id]
            pv = table.p.loc[m, c.id]
            row[f"{c.id}_p"] = "" if math.isnan(pv) else f"{pv:.4g}"
            row[f"{c.id}_significant"] = bool(table.significant.loc[m, c.id])
            row[f"{c.id}_bold"] = bool(table.best.loc[m, c.id])
            if table.published is not None:
                row[f"{c.id}_published"] = table.published.loc[m, c.id]
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_frame(table: Table) -> pd.DataFrame:
    """Long form: one row per (method, column) with reproduced, published and their difference."""
    assert table.published is not None
    rows = []
    for m in table.methods:
        for c in table.columns:
            ours, pub = table.mean.loc[m, c.id], table.published.loc[m, c.id]
            rows.append({"group": table.groups[m], "method": m, "column": c.id, "dataset": c.dataset, "task": c.task,
                         "reproduced": ours, "std": table.std.loc[m, c.id], "n": int(table.n.loc[m, c.id]),
                         "published": pub, "difference": ours - pub})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Writing


def parse_formats(spec: Any) -> List[str]:
    """``md,csv`` or a list -> checked list of formats (default: all)."""
    if spec is None:
        return list(FORMATS)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    bad = [s for s in items if s not in FORMATS]
    if bad:
        raise ValueError(f"--format: unknown format(s) {', '.join(bad)}; known: {', '.join(FORMATS)}")
    return items


def feature_pictures(table: Table, out_dir: Path) -> List[Path]:
    """``features*.png`` that a method wrote (the image-guided method's feature picture) under the
    run's ``report/`` directory or ``out_dir``, one per file name."""
    found: Dict[str, Path] = {}
    dirs = [Path(out_dir)] + ([Path(table.run_dir) / "report"] if table.run_dir is not None else [])
    for d in dirs:
        for p in sorted(d.glob("features*.png")):
            found.setdefault(p.name, p)
    return [found[k] for k in sorted(found)]


def write_report(table: Table, out_dir: Path, formats: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """Write the requested formats (default all) to ``out_dir``; returns {name: path}."""
    formats = parse_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    images: Dict[str, bytes] = {}
    if "png" in formats or "html" in formats:
        from harness.reporting.plots import make_plots

        images = make_plots(table)
    if "png" in formats:
        for name, data in images.items():
            paths[name] = out_dir / name
            paths[name].write_bytes(data)
    pictures = feature_pictures(table, out_dir)
    if "md" in formats:
        shown = ([paths[k] for k in images] if "png" in formats else []) + pictures
        paths["md"] = out_dir / "table1.md"
        paths["md"].write_text(render_markdown(table, plots=[os.path.relpath(p, out_dir) for p in shown]))
    if "csv" in formats:
        paths["csv"] = out_dir / "table1.csv"
        to_csv_frame(table).to_csv(paths["csv"], index=False, float_format="%.2f")
        paths["csv-seeds"] = out_dir / "table1-seeds.csv"
        table.results.to_csv(paths["csv-seeds"], index=False, float_format="%.4f")
        if table.published is not None:
            paths["csv-published"] = out_dir / "table1-published.csv"
            comparison_frame(table).to_csv(paths["csv-published"], index=False, float_format="%.2f")
    if "tex" in formats:
        from harness.reporting.latex import render_latex

        paths["tex"] = out_dir / "table1.tex"
        paths["tex"].write_text(render_latex(table))
    if "html" in formats:
        from harness.reporting.html import render_html

        paths["html"] = out_dir / "table1.html"
        figures = dict(images)
        figures.update({p.name: p.read_bytes() for p in pictures})
        paths["html"].write_text(render_html(table, figures))
    log.info("report.write dir=%s files=%d formats=%s", out_dir, len(paths), ",".join(formats))
    return paths


def print_report(table: Table, console: Any) -> None:
    console.print(render_rich(table))
    for note in legend(table):
        console.print(f"  {note}", highlight=False, style="dim", soft_wrap=True)
    if table.missing:
        console.print("[bold]Missing cells[/bold]")
        for m, c, why in table.missing:
            console.print(f"  [dim]—[/dim] {m} / {c}: {why}", highlight=False, soft_wrap=True)
    if table.published is not None:
        console.print(render_rich_comparison(table))
        console.print(f"  {comparison_legend(table)}", highlight=False, style="dim", soft_wrap=True)
