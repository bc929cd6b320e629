"""Plots of a Table (matplotlib, Agg canvas, PNG bytes): deltas with error bars, training curves.

- ``deltas.png``: per column, each method's delta against Scratch (percentage points) as a bar,
  with the ``1 - alpha`` paired t interval over seeds as error bar (none with one seed) and ``*``
  over significant deltas.
- ``curves-finetune-<column>.png``: per column, the training loss and the validation metric
  against step of every method (one line per seed), from ``cells/<cell>/metrics-finetune.jsonl``
  (eval lines appear when ``trainer.eval_every`` > 0; the final result is the last point).
- ``curves-pretrain.png``: the pre-training loss of every method and seed
  (``pretrain/<method>__s<seed>/metrics-*.jsonl``; a method with stages has one line per stage).

The figures use ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, no global
backend state, no display needed.
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from harness.store import read_jsonl

if TYPE_CHECKING:  # pragma: no cover
    from harness.report import Table

log = logging.getLogger(__name__)

Curve = Tuple[List[float], List[float]]


def read_metrics_log(path: Path) -> Tuple[Dict[str, Curve], Dict[str, Curve]]:
    """(train, val) curves of one JSON-lines metric log: {key: (steps, values)}.

    Train lines are ``{"step", "loss", "lr", "time", ...}``; eval lines carry ``"split": "val"``.
    A torn last line (a job still writing) and non-numeric fields are skipped.
    """
    train: Dict[str, Curve] = {}
    val: Dict[str, Curve] = {}
    try:
        records, _ = read_jsonl(Path(path))
    except OSError:
        return train, val
    for rec in records:
        if "step" not in rec:
            continue
        target = val if rec.get("split") == "val" else train
        for key, v in rec.items():
            if key in ("step", "split", "time", "lr") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            steps, values = target.setdefault(key, ([], []))
            steps.append(float(rec["step"]))
            values.append(float(v))
    return train, val


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _colours(names: List[str]) -> Dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def plot_deltas(table: "Table") -> Optional[bytes]:
    """Bars of the deltas against Scratch per column with their paired-t error bars."""
    from matplotlib.figure import Figure

    from harness.report import BASELINE, method_title

    methods = [m for m in table.methods if m != BASELINE and table.delta.loc[m].notna().any()]
    if not methods:
        log.info("report.plot skipped=deltas reason=no_deltas")
        return None
    cols = table.columns
    colours = _colours(table.methods)
    width = min(0.8 / len(methods), 0.25)
    left = -width * len(methods) / 2.0
    fig = Figure(figsize=(max(6.0, 1.3 * len(cols) + 2.5), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    level = 100 * (1 - table.settings.alpha)
    any_bars = False
    for i, m in enumerate(methods):
        xs, ys, lo, hi, stars = [], [], [], [], []
        for j, c in enumerate(cols):
            d = table.delta.loc[m, c.id]
            if math.isnan(d):
                continue
            xs.append(j + left + width * (i + 0.5))
            ys.append(d)
            a, b = table.ci_low.loc[m, c.id], table.ci_high.loc[m, c.id]
            lo.append(0.0 if math.isnan(a) else max(0.0, d - a))  # >= 0: a zero-width interval rounds
            hi.append(0.0 if math.isnan(b) else max(0.0, b - d))
            stars.append(bool(table.significant.loc[m, c.id]))
        if not xs:
            continue
        any_bars = True
        ax.bar(xs, ys, width=width * 0.95, color=colours[m], label=method_title(m),
               yerr=[lo, hi] if any(lo) or any(hi) else None, capsize=3, ecolor="0.25")
        for x, y, up, star in zip(xs, ys, hi, stars):
            if star:
                ax.annotate("*", (x, y + up if y >= 0 else y - up), ha="center",
                            va="bottom" if y >= 0 else "top", fontsize=12, fontweight="bold")
    if not any_bars:
        return None
    ax.axhline(0.0, color="0.2", linewidth=0.8)
    ax.set_xlim(-0.6, len(cols) - 0.4)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{c.group}\n{c.label}" for c in cols])
    ax.set_ylabel("Δ against Scratch (points)")
    n = table.n_max
    bars = f"error bars: {level:g}% paired t interval over {n} seeds" if n > 1 else "one seed: no error bars"
    ax.set_title(f"Table 1 — {table.sweep}: delta against Scratch ({bars}; * p < {table.settings.alpha:g})",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(5, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.14),
              frameon=False)
    return _png(fig)


def _cell_logs(table: "Table") -> Dict[Tuple[str, str, int], Path]:
    """(method, column, seed) -> metrics-finetune.jsonl of every planned cell that has one."""
    from harness.store import Store

    if table.run_dir is None:
        return {}
    store = Store(table.run_dir)
    plan = store.read_plan() or {"jobs": []}
    out = {}
    for j in plan["jobs"]:
        if j["kind"] == "finetune":
            path = store.job_dir("finetune", j["id"]) / "metrics-finetune.jsonl"
            if path.is_file():
                out[(j["method"], j["column"], int(j["seed"]))] = path
    return out


def plot_finetune_curves(table: "Table") -> Dict[str, bytes]:
    """One figure per column: training loss and validation metric against step, per method and seed."""
    from matplotlib.figure import Figure

    from harness.report import METRIC_NAMES, method_title

    logs = _cell_logs(table)
    colours = _colours(table.methods)
    out: Dict[str, bytes] = {}
    for c in table.columns:
        mine = {k: p for k, p in logs.items() if k[1] == c.id}
        if not mine:
            continue
        metric = table.metrics.get(c.id, "")
        fig = Figure(figsize=(10.0, 3.6))
        ax_loss, ax_val = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        labelled = set()
        for (m, _, seed), path in sorted(mine.items(), key=lambda kv: (table.methods.index(kv[0][0])
                                                                       if kv[0][0] in table.methods else 99, kv[0][2])):
            train, val = read_metrics_log(path)
            label = method_title(m) if m not in labelled else None
            labelled.add(m)
            if "loss" in train:
                ax_loss.plot(*train["loss"], color=colours.get(m), linewidth=1.0, alpha=0.85, label=label,
                             marker="o" if len(train["loss"][0]) == 1 else None, markersize=3)
            steps, values = val.get(metric, ([], [])) if metric else ([], [])
            steps, values = list(steps), [100.0 * v for v in values]
            final = table.values(m, c.id).get(seed)
            if final is not None and "loss" in train and train["loss"][0]:
                steps.append(train["loss"][0][-1])
                values.append(final)
            if steps:
                ax_val.plot(steps, values, color=colours.get(m), marker="o", markersize=3, linewidth=1.0,
                            alpha=0.85, label=label)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss")
        ax_val.set_xlabel("step")
        ax_val.set_ylabel(f"validation {METRIC_NAMES.get(metric, metric or 'metric')} (%)")
        for ax in (ax_loss, ax_val):
            ax.grid(alpha=0.3)
        if ax_loss.lines:
            ax_loss.legend(fontsize=8)
        if ax_val.lines:
            ax_val.legend(fontsize=8)
        fig.suptitle(f"Fine-tuning curves — {c.group} {c.label} ({c.id}); one line per seed", fontsize=10)
        out[f"curves-finetune-{_slug(c.id)}.png"] = _png(fig)
    return out


def plot_pretrain_curves(table: "Table") -> Optional[bytes]:
    """The pre-training loss of every method and seed (one line per stage log)."""
    from matplotlib.figure import Figure

    from harness.report import method_title

    if table.run_dir is None:
        return None
    base = Path(table.run_dir) / "pretrain"
    colours = _colours(table.methods)
    found: List[Tuple[str, int, str, Path]] = []
    for m in table.methods:
        for d in sorted(base.glob(f"{m}__s*")):
            match = re.fullmatch(rf"{re.escape(m)}__s(-?\d+)", d.name)
            if not match:
                continue
            for path in sorted(d.glob("metrics-*.jsonl")):
                found.append((m, int(match.group(1)), path.stem[len("metrics-"):], path))
    if not found:
        return None
    fig = Figure(figsize=(7.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    styles = ["-", "--", ":", "-."]
    stages: Dict[str, str] = {}
    labelled = set()
    for m, seed, stage, path in found:
        train, _ = read_metrics_log(path)
        if "loss" not in train:
            continue
        ls = stages.setdefault(stage, styles[len(stages) % len(styles)])
        key = (m, stage)
        label = f"{method_title(m)} ({stage})" if key not in labelled else None
        labelled.add(key)
        ax.plot(*train["loss"], color=colours.get(m), linestyle=ls, linewidth=1.0, alpha=0.85, label=label,
                marker="o" if len(train["loss"][0]) == 1 else None, markersize=3)  # one logged point shows
    if not ax.lines:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Pre-training curves — {table.sweep}; one line per seed", fontsize=10)
    return _png(fig)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def make_plots(table: "Table") -> Dict[str, bytes]:
    """Every plot the table's data allows, as {file name: PNG bytes}."""
    out: Dict[str, bytes] = {}
    for name, draw in (("deltas.png", plot_deltas), ("", plot_finetune_curves),
                       ("curves-pretrain.png", plot_pretrain_curves)):
        try:  # a plot that cannot be drawn must not cost the report its tables
            picture = draw(table)
        except Exception as exc:  # noqa: BLE001 - matplotlib raises many kinds
            log.warning("report.plot_failed plot=%s error=%s: %s", name or "curves-finetune", type(exc).__name__, exc)
            continue
        if isinstance(picture, dict):
            out.update(picture)
        elif picture is not None:
            out[name] = picture
    log.info("report.plots n=%d names=%s", len(out), ",".join(out))
    return out
