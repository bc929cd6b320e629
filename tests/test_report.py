"""Table 1 from a hand-made store: values, deltas against Scratch, best per group, missing cells."""

from __future__ import annotations

import math

import pytest

from harness.report import build_table, render_markdown, write_report
from harness.store import Store

COLUMNS = [("s3dis-semseg", "s3dis", "semseg"), ("scannet-semseg", "scannet", "semseg"),
           ("scannet-detection", "scannet", "detection")]
METHODS = ["scratch", "pointcontrast", "csc", "depthcontrast", "image_guided"]


def make_store(tmp_path, values, failed=(), seeds=(0,)):
    """values[(method, column)] = list of metric fractions (one per seed)."""
    store = Store(tmp_path / "runs" / "t")
    jobs = []
    for m in METHODS:
        for cid, ds, task in COLUMNS:
            for seed in seeds:
                jid = f"{m}__{cid}__s{seed}"
                jobs.append({"kind": "finetune", "id": jid, "method": m, "column": cid, "dataset": ds, "task": task,
                             "seed": seed, "config_hash": "h" + jid})
                if (m, cid) in failed:
                    store.write("finetune", jid, {"status": "failed", "config_hash": "h" + jid,
                                                  "error": "RuntimeError: boom", "log": "/logs/1.err"})
                elif (m, cid) in values:
                    v = values[(m, cid)][seed]
                    store.write("finetune", jid, {"status": "done", "config_hash": "h" + jid, "metric": "miou",
                                                  "value": v})
    groups = {"scratch": "Scratch", "pointcontrast": "Multi-scan", "csc": "Multi-scan",
              "depthcontrast": "Single-scan", "image_guided": "Single-scan"}
    store.write_plan({"sweep": "t", "methods": METHODS, "groups": groups, "seeds": list(seeds), "columns": [c[0] for c in COLUMNS],
                      "jobs": jobs})
    return store


def test_values_deltas_and_best(tmp_path):
    values = {("scratch", "s3dis-semseg"): [0.651], ("pointcontrast", "s3dis-semseg"): [0.662],
              ("csc", "s3dis-semseg"): [0.690], ("depthcontrast", "s3dis-semseg"): [0.649],
              ("image_guided", "s3dis-semseg"): [0.665], ("scratch", "scannet-semseg"): [0.674],
              ("csc", "scannet-semseg"): [0.676]}
    store = make_store(tmp_path, values, failed={("pointcontrast", "scannet-semseg")})
    t = build_table(store.root)
    # row order: Scratch, Multi-scan (pointcontrast, csc), Single-scan (depthcontrast, image_guided)
    assert t.methods == METHODS
    # columns grouped by dataset in sweep order
    assert [c.id for c in t.columns] == ["s3dis-semseg", "scannet-semseg", "scannet-detection"]
    assert t.mean.loc["csc", "s3dis-semseg"] == pytest.approx(69.0)
    assert t.delta.loc["csc", "s3dis-semseg"] == pytest.approx(3.9)
    assert t.delta.loc["depthcontrast", "s3dis-semseg"] == pytest.approx(-0.2)
    assert t.best.loc["csc", "s3dis-semseg"] and not t.best.loc["pointcontrast", "s3dis-semseg"]
    assert t.best.loc["image_guided", "s3dis-semseg"] and not t.best.loc["depthcontrast", "s3dis-semseg"]
    assert not t.best.loc["scratch"].any()
    assert math.isnan(t.mean.loc["pointcontrast", "scannet-semseg"])
    reasons = {(m, c): why for m, c, why in t.missing}
    assert reasons[("pointcontrast", "scannet-semseg")] == "failed: RuntimeError: boom (log: /logs/1.err)"
    assert reasons[("scratch", "scannet-detection")] == "not run yet"
    md = render_markdown(t)
    assert "**69.0 (+3.9)**" in md and "64.9 (-0.2)" in md and "| Scratch | scratch | 65.1 | 67.4 | — |" in md
    paths = write_report(t, store.root / "report")
    csv = paths["csv"].read_text().splitlines()
    assert csv[0].startswith("group,method,s3dis-semseg,s3dis-semseg_delta,s3dis-semseg_n")
    assert csv[3].startswith("Multi-scan,csc,69.00,3.90,1")


def test_mean_over_seeds(tmp_path):
    values = {("scratch", "s3dis-semseg"): [0.60, 0.62], ("csc", "s3dis-semseg"): [0.64, 0.70]}
    store = make_store(tmp_path, values, seeds=(0, 1))
    t = build_table(store.root)
    assert t.mean.loc["csc", "s3dis-semseg"] == pytest.approx(67.0)
    assert t.std.loc["csc", "s3dis-semseg"] == pytest.approx(math.sqrt(18.0))
    assert t.n.loc["csc", "s3dis-semseg"] == 2
    assert t.delta.loc["csc", "s3dis-semseg"] == pytest.approx(6.0)


def test_stale_result_is_not_shown(tmp_path):
    store = make_store(tmp_path, {("scratch", "s3dis-semseg"): [0.5]})
    r = store.read("finetune", "scratch__s3dis-semseg__s0")
    r["config_hash"] = "old"
    store.write("finetune", "scratch__s3dis-semseg__s0", r)
    t = build_table(store.root)
    assert math.isnan(t.mean.loc["scratch", "s3dis-semseg"])
    assert ("scratch", "s3dis-semseg", "stale result (config changed)") in t.missing
