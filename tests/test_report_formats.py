"""Report formats on hand-made runs: published comparison, LaTeX (compiled when TeX is present),
HTML in headless chromium (when installed), plots, partial and failed sweeps, the CLI."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from harness.cli import main as cli_main
from harness.report import build_table, render_markdown, write_report
from harness.reporting.latex import render_latex
from harness.reporting.plots import read_metrics_log
from harness.reporting.published import load_published
from tests.test_report import METHODS, make_store

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
PDFLATEX = shutil.which("pdflatex")


def _values():
    # 2 seeds; s3dis-semseg: csc d = (3, 4) vs scratch -> mean 3.5, sd 0.7071, t = 3.5 / 0.5 = 7,
    # df = 1: p = 1 - 2 atan(7) / pi = 0.0903 (Cauchy) -> not significant at 0.05
    return {("scratch", "s3dis-semseg"): [0.650, 0.652], ("pointcontrast", "s3dis-semseg"): [0.660, 0.664],
            ("csc", "s3dis-semseg"): [0.680, 0.692], ("depthcontrast", "s3dis-semseg"): [0.649, 0.649],
            ("image_guided", "s3dis-semseg"): [0.665, 0.665], ("scratch", "scannet-semseg"): [0.674, 0.674],
            ("csc", "scannet-semseg"): [0.676, 0.678]}


def _with_logs(store, seeds=(0, 1)):
    """Metric logs for the cells that have results (loss falls, val mIoU rises) and one pre-training log."""
    plan = store.read_plan()
    for j in plan["jobs"]:
        r = store.read("finetune", j["id"])
        if not r or r.get("status") != "done":
            continue
        lines = []
        for step in range(10, 101, 10):
            lines.append({"step": step, "loss": 2.0 / (1 + step / 20) + 0.01 * j["seed"], "lr": 0.1, "time": step / 10})
            if step % 50 == 0 and step < 100:
                lines.append({"step": step, "split": "val", "miou": r["value"] * step / 100})
        path = store.job_dir("finetune", j["id"]) / "metrics-finetune.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 11')  # torn last line
    pre = store.job_dir("pretrain", "image_guided__s0")
    pre.mkdir(parents=True)
    for stage in ("stage1", "stage2"):
        (pre / f"metrics-{stage}.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 5.0 / s, "lr": 0.01, "time": s}) + "\n" for s in range(10, 60, 10)))


def test_read_metrics_log(tmp_path):
    path = tmp_path / "metrics-finetune.jsonl"
    path.write_text('{"step": 10, "loss": 1.5, "lr": 0.1, "time": 1.0, "acc": 0.3}\n'
                    '{"step": 10, "split": "val", "miou": 0.25}\n'
                    '{"step": 20, "loss": 1.0, "lr": 0.1, "time": 2.0, "acc": 0.5}\n'
                    '{"step": 2')
    train, val = read_metrics_log(path)
    assert train["loss"] == ([10.0, 20.0], [1.5, 1.0]) and train["acc"] == ([10.0, 20.0], [0.3, 0.5])
    assert "lr" not in train and "time" not in train
    assert val == {"miou": ([10.0], [0.25])}


def test_published_table_is_the_papers():
    frame, source = load_published("published")
    assert len(frame) == 35 and "Janda" in source
    get = {(r.method, r.dataset, r.task): r.value for r in frame.itertuples()}
    assert get[("csc", "s3dis", "semseg")] == 69.0 and get[("image_guided", "scannet", "detection")] == 37.7
    assert get[("scratch", "sunrgbd", "detection")] == 32.0 and get[("depthcontrast", "s3dis", "instseg")] == 52.3


def test_published_comparison_side_by_side(tmp_path):
    store = make_store(tmp_path, _values(), seeds=(0, 1))
    t = build_table(store.root, compare="published")
    # csc S3DIS: reproduced (68.0 + 69.2) / 2 = 68.6, published 69.0 -> -0.4; ScanNet detection published only
    assert t.published.loc["csc", "s3dis-semseg"] == 69.0
    assert t.published.loc["scratch", "scannet-detection"] == 35.2
    md = render_markdown(t)
    assert "68.6 / 69.0 (-0.4)" in md and "67.7 / 67.6 (+0.1)" in md  # csc ScanNet: 67.7 vs 67.6
    assert "— / 35.2" in md  # not run: only the published value
    paths = write_report(t, tmp_path / "out", ["csv"])
    rows = paths["csv-published"].read_text().splitlines()
    assert rows[0] == "group,method,column,dataset,task,reproduced,std,n,published,difference"
    assert "Multi-scan,csc,s3dis-semseg,s3dis,semseg,68.60,0.85,2,69.00,-0.40" in rows
    # a custom published CSV; a method it lacks shows the dash
    custom = tmp_path / "mine.csv"
    custom.write_text("# my numbers\nmethod,dataset,task,metric,value\nscratch,s3dis,semseg,miou,60\n")
    t2 = build_table(store.root, compare=str(custom))
    assert t2.published.loc["scratch", "s3dis-semseg"] == 60.0 and math.isnan(t2.published.loc["csc", "s3dis-semseg"])
    assert t2.published_source == "my numbers"
    bad = tmp_path / "bad.csv"
    bad.write_text("method,dataset,task,metric,value\nscratch,s3dis,semseg,miou,sixty\n")
    with pytest.raises(ValueError, match="bad.csv.*'sixty' is not a number"):
        build_table(store.root, compare=str(bad))


def test_latex_layout_and_bold(tmp_path):
    store = make_store(tmp_path, _values(), seeds=(0,))
    tex = render_latex(build_table(store.root))
    # one seed: the paper's rule, bold = highest of the group: csc (69.2... seed 0 = 68.0) and image_guided 66.5
    assert re.findall(r"\\textbf\{([0-9.]+)\}", tex) == ["68.0", "67.6", "66.5"]
    assert r"\multicolumn{1}{c}{S3DIS}" in tex and r"\multicolumn{2}{c}{ScanNet}" in tex
    assert r"\cmidrule(lr){3-3} \cmidrule(lr){4-5}" in tex
    assert r"Multi-scan & PointContrast & 66.0\,{\scriptsize (+1.0)}" in tex
    assert r"Single-scan & DepthContrast & 64.9\,{\scriptsize ($-$0.1)}" in tex
    assert tex.count(r"\midrule") == 3 and r"\toprule" in tex and r"\bottomrule" in tex
    assert "n=1: no test" in tex


@pytest.mark.skipif(PDFLATEX is None, reason="no TeX installation (pdflatex); CI has none")
def test_latex_compiles(tmp_path):
    store = make_store(tmp_path, _values(), seeds=(0, 1))
    t = build_table(store.root, compare="published")
    tex = render_latex(t)
    # two seeds: csc S3DIS vs pointcontrast d = (2, 2.8): mean 2.4, sd 0.566, t = 6, df 1: p = 1 - 2 atan(6)/pi = 0.105
    # -> tied, no bold in Multi-scan S3DIS; image_guided vs depthcontrast d = (1.6, 1.6): constant shift, p = 0 -> bold
    assert re.findall(r"\\textbf\{([0-9.]+)\}", tex) == ["67.7", "66.5"]
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage[margin=1cm,landscape]{geometry}\n\\usepackage{booktabs}\n"
                   "\\begin{document}\n" + tex + "\n\\end{document}\n")
    if subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                      capture_output=True, timeout=120).returncode != 0:
        pytest.fail((tmp_path / "doc.log").read_text()[-3000:])
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def _png_size(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.size, img


def test_plots_from_logs(tmp_path):
    store = make_store(tmp_path, _values(), seeds=(0, 1))
    _with_logs(store)
    (store.root / "report").mkdir()
    (store.root / "report" / "features-scene0.png").write_bytes(_tiny_png())
    paths = write_report(build_table(store.root), store.root / "report", ["png", "md"])
    names = sorted(p.name for k, p in paths.items() if k.endswith(".png"))
    assert names == ["curves-finetune-s3dis-semseg.png", "curves-finetune-scannet-semseg.png",
                     "curves-pretrain.png", "deltas.png"]
    for name in names:
        (w, h), img = _png_size((store.root / "report" / name).read_bytes())
        assert w > 300 and h > 200
        assert len(np.unique(np.asarray(img.convert("L")))) > 10  # something is drawn
    md = paths["md"].read_text()
    assert "![deltas](deltas.png)" in md and "![features-scene0](features-scene0.png)" in md
    # written elsewhere (--out): the picture in the run's report/ is still linked, relative to the output
    other = write_report(build_table(store.root), tmp_path / "elsewhere", ["md"])["md"].read_text()
    assert "![features-scene0](../runs/t/report/features-scene0.png)" in other
    page = write_report(build_table(store.root), tmp_path / "elsewhere", ["html"])["html"].read_text()
    assert "data:image/png;base64," + base64.b64encode(_tiny_png()).decode() in page


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PROBE = """<script>
window.addEventListener('load', () => {
  const t = document.querySelector('table.t1'); const r = t.getBoundingClientRect();
  const imgs = [...document.images].map(i => i.naturalWidth);
  const bold = [...t.querySelectorAll('.best')].map(e => e.textContent);
  const cell = t.tBodies[1].rows[0].cells[2];
  const probe = document.createElement('pre'); probe.id = 'probe';
  probe.textContent = JSON.stringify({w: r.width, h: r.height, rows: t.rows.length, imgs, bold,
    boldWeight: getComputedStyle(t.querySelector('.best')).fontWeight,
    weight: getComputedStyle(cell).fontWeight, text: cell.innerText});
  document.body.appendChild(probe);
});
</script>"""


def _chromium(args, tmp_path, timeout=90):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    store = make_store(tmp_path, _values(), seeds=(0, 1))
    _with_logs(store)
    paths = write_report(build_table(store.root, compare="published"), store.root / "report", ["html"])
    page = paths["html"].read_text()
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    assert page.count("data:image/png;base64,") == 4
    # The page as the browser lays it out: a probe script reads the table's box, the decoded images and a cell.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    out = _chromium(["--dump-dom", "--virtual-time-budget=5000", probe.as_uri()], tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert m, f"chromium printed no probe: rc={out.returncode} stderr={out.stderr[-2000:]}"
    got = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert got["w"] > 400 and got["h"] > 100 and got["rows"] == 2 + len(METHODS)
    assert len(got["imgs"]) == 4 and min(got["imgs"]) > 300  # every inlined PNG decoded
    # Multi-scan S3DIS: csc 68.6 ± 0.8 (+3.5), tied with pointcontrast (p = 0.105, see test_latex_compiles): not bold;
    # the bold cells are csc's ScanNet value (only member with a result there) and image_guided's S3DIS value
    assert got["bold"] == ["67.7", "66.5"]
    # pointcontrast S3DIS: (66.0, 66.4) -> 66.2 ± 0.28, delta +1.1 with d = (1.0, 1.2): t = 11, p = 0.058, no mark
    assert got["text"].replace("\u2009", "") == "66.2±0.3 (+1.1)"
    assert int(got["weight"]) < 600 <= int(got["boldWeight"])
    # The screenshot of the page itself (look at it: tests/.. writes it to tmp_path)
    shot = tmp_path / "table1.png"
    out = _chromium([f"--screenshot={shot}", "--window-size=1400,1800", "--hide-scrollbars", paths["html"].as_uri()],
                    tmp_path)
    assert shot.is_file(), f"no screenshot: rc={out.returncode} stderr={out.stderr[-2000:]}"
    (w, h), img = _png_size(shot.read_bytes())
    assert (w, h) == (1400, 1800)
    # the table's top-left region has dark text on a white page
    crop = np.asarray(img.convert("L").crop((0, 0, 900, 400)))
    assert crop.min() < 80 and crop.max() > 240
    if os.environ.get("HARNESS_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["HARNESS_KEEP_SCREENSHOT"])


def test_partial_and_failed_sweep(tmp_path, capsys):
    values = {("scratch", "s3dis-semseg"): [0.65], ("csc", "s3dis-semseg"): [0.69]}
    store = make_store(tmp_path, values, failed={("pointcontrast", "scannet-semseg")})
    plan = store.read_plan()
    # pre-training jobs: depthcontrast failed, image_guided still running; cells wait on them
    for m in ("pointcontrast", "csc", "depthcontrast", "image_guided"):
        plan["jobs"].append({"kind": "pretrain", "id": f"{m}__s0", "method": m, "seed": 0, "config_hash": f"p{m}"})
        for j in plan["jobs"]:
            if j["kind"] == "finetune" and j["method"] == m:
                j["pretrain_id"] = f"{m}__s0"
    for m in ("pointcontrast", "csc"):
        store.write("pretrain", f"{m}__s0", {"status": "done", "config_hash": f"p{m}"})
    store.write("pretrain", "depthcontrast__s0", {"status": "failed", "config_hash": "pdepthcontrast",
                                                  "error": "ValueError: no frames", "log": "/logs/7.err"})
    for j in plan["jobs"]:
        if j.get("id") == "csc__scannet-detection__s0":
            j["task_cfg"] = {"steps": 300}
    store.write_plan(plan)
    running = store.job_dir("finetune", "csc__scannet-detection__s0")
    running.mkdir(parents=True)
    (running / "metrics-finetune.jsonl").write_text('{"step": 120, "loss": 1.0}\n')
    t = build_table(store.root)
    why = {(m, c): r for m, c, r in t.missing}
    assert why[("depthcontrast", "s3dis-semseg")] == \
        "pre-training depthcontrast__s0 failed: ValueError: no frames (log: /logs/7.err)"
    assert why[("image_guided", "s3dis-semseg")] == "not run yet (waits for pre-training image_guided__s0)"
    pre_log = store.job_dir("pretrain", "image_guided__s0") / "metrics-stage2.jsonl"
    pre_log.parent.mkdir(parents=True)
    pre_log.write_text('{"step": 40, "loss": 2.0}\n{"step": 50, "loss": 1.9}\n')
    why = {(m, c): r for m, c, r in build_table(store.root).missing}
    assert why[("image_guided", "s3dis-semseg")] == \
        "not run yet (waits for pre-training image_guided__s0, running or interrupted at step 50)"
    assert why[("csc", "scannet-detection")] == "running or interrupted at step 120/300 (no result yet)"
    assert why[("pointcontrast", "scannet-semseg")] == "failed: RuntimeError: boom (log: /logs/1.err)"
    assert why[("scratch", "scannet-semseg")] == "not run yet"
    # the CLI reports a partial sweep (exit 0), says what is missing and writes every format
    rc = cli_main(["report", str(store.root), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0 and "Missing cells" in out and "2 of 15 fine-tuning runs have a result" in out
    assert {p.name for p in (tmp_path / "rep").iterdir()} >= {"table1.md", "table1.csv", "table1-seeds.csv",
                                                              "table1.tex", "table1.html", "deltas.png"}


def test_empty_sweep_writes_every_format(tmp_path):
    store = make_store(tmp_path, {})
    paths = write_report(build_table(store.root), tmp_path / "rep")
    assert {"md", "csv", "tex", "html"} <= set(paths) and not any(k.endswith(".png") for k in paths)
    assert "No results yet: 0 of 15 fine-tuning runs have a result" in paths["md"].read_text()
    # results without Scratch: no deltas, no tests, said so
    store2 = make_store(tmp_path / "b", {("csc", "s3dis-semseg"): [0.6]})
    assert "No Scratch results: no deltas and no tests." in render_markdown(build_table(store2.root))


def test_cli_compare_and_format(tmp_path, capsys):
    store = make_store(tmp_path, _values(), seeds=(0, 1))
    rc = cli_main(["report", str(store.root), "--compare", "published", "--format", "md,tex", "--alpha", "0.2"])
    out = capsys.readouterr().out
    assert rc == 0 and "Reproduced vs published" in out
    assert sorted(p.name for p in (store.root / "report").iterdir()) == ["table1.md", "table1.tex"]
    md = (store.root / "report" / "table1.md").read_text()
    # alpha 0.2: csc S3DIS d = (3, 4) vs scratch: t = 7, df 1, p = 1 - 2 atan(7) / pi = 0.0903 < 0.2 -> marked
    # and csc - pointcontrast (p = 0.105, see test_latex_compiles) < 0.2: now bold
    assert "**68.6 ± 0.8 (+3.5\\*)**" in md and "α=0.2" in md
    assert cli_main(["report", str(store.root), "--format", "pdf"]) == 2
    assert "unknown format(s) pdf" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2


def test_sweep_report_config_is_checked(tmp_path):
    from harness.config import ConfigError, load_sweep

    sweep = os.path.join(os.path.dirname(__file__), "..", "configs", "sweeps", "table1.yaml")
    cfg = load_sweep(sweep, ["report.alpha=0.01", "report.formats=[md,html]"])
    assert cfg.cfg.report.alpha == 0.01 and list(cfg.cfg.report.formats) == ["md", "html"]
    with pytest.raises(ConfigError, match="report.alpha must be in"):
        load_sweep(sweep, ["report.alpha=1.5"])
    with pytest.raises(ConfigError, match="report.formats: unknown format"):
        load_sweep(sweep, ["report.formats=[md,docx]"])
    with pytest.raises(ConfigError, match="report.correction must be one of"):
        load_sweep(sweep, ["report.correction=bonferroni"])
    with pytest.raises(ConfigError, match="unknown key 'report.alhpa'"):
        load_sweep(sweep, ["report.alhpa=0.1"])


def test_a_row_named_otherwise_gets_its_methods_published_values(tmp_path):
    import json

    store = make_store(tmp_path, _values(), seeds=(0, 1))
    plan = json.loads((store.root / "plan.json").read_text())
    for j in plan["jobs"]:  # the csc row renamed: csc_long: {method: csc}
        if j["method"] == "csc":
            j["method"], j["method_cfg"] = "csc_long", {"method": "csc", "steps": 60000}
    plan["methods"] = ["csc_long" if m == "csc" else m for m in plan["methods"]]
    plan["groups"]["csc_long"] = plan["groups"].pop("csc")
    (store.root / "plan.json").write_text(json.dumps(plan))
    t = build_table(store.root, compare="published")
    assert t.published.loc["csc_long", "s3dis-semseg"] == 69.0
