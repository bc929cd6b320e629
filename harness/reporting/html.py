"""Table 1 as one self-contained HTML page: the table, its notes, missing cells, the published
comparison and every plot inlined as a base64 PNG (no external file, script or font).
"""

from __future__ import annotations

import base64
import html
from itertools import groupby
from typing import TYPE_CHECKING, Callable, Dict, List

if TYPE_CHECKING:  # pragma: no cover
    from harness.report import Table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table.t1 { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 1em 0; }
table.t1 th, table.t1 td { padding: 0.3em 0.7em; }
table.t1 thead tr:first-child th { border-top: 2px solid #222; }
table.t1 thead tr:last-child th { border-bottom: 1px solid #222; }
table.t1 th.span { border-bottom: 1px solid #888; }
table.t1 tbody tr.first td { border-top: 1px solid #222; }
table.t1 tbody:last-of-type tr:last-child td { border-bottom: 2px solid #222; }
table.t1 td.num { text-align: right; white-space: nowrap; }
table.t1 td.missing { color: #999; text-align: center; }
.best { font-weight: 700; }
.pm, .n { color: #777; font-size: 0.85em; }
.delta { font-size: 0.85em; } .up { color: #1a7f37; } .down { color: #c62828; }
.notes { color: #444; font-size: 0.9em; max-width: 70em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _cell(table: "Table", method: str, column: str) -> str:
    from harness.report import SIG_MARK, cell_view

    view = cell_view(table, method, column)
    if view.empty:
        return '<td class="missing">—</td>'
    s = f'<span class="best">{view.value}</span>' if view.bold else view.value
    if view.std:
        s += f'<span class="pm">&thinsp;±&thinsp;{view.std}</span>'
    if view.delta:
        cls = "up" if view.sign > 0 else "down" if view.sign < 0 else ""
        mark = f"<sup>{SIG_MARK}</sup>" if view.significant else ""
        s += f' <span class="delta {cls}">({view.delta}{mark})</span>'
    if view.n_note:
        s += f' <span class="n">{view.n_note}</span>'
    title = ""
    p = table.p.loc[method, column] if table.p.size else float("nan")
    if p == p:  # a test was made
        title = f' title="paired t-test p={p:.3g}, n={int(table.n_pairs.loc[method, column])}"'
    return f'<td class="num"{title}>{s}</td>'


def _compare_cell(table: "Table", method: str, column: str) -> str:
    from harness.report import compare_text

    text = compare_text(table, method, column)
    return f'<td class="{"missing" if text == "—" else "num"}">{html.escape(text)}</td>'


def _table(table: "Table", cell: Callable[["Table", str, str], str], caption: str) -> List[str]:
    from harness.report import method_title

    cols = table.columns
    spans = [(g, len(list(items))) for g, items in groupby(cols, key=lambda c: c.group)]
    out = ['<table class="t1">', f"<caption>{html.escape(caption)}</caption>", "<thead>",
           '<tr><th rowspan="2">Group</th><th rowspan="2">Pre-training</th>'
           + "".join(f'<th class="span" colspan="{k}">{html.escape(g)}</th>' for g, k in spans) + "</tr>",
           "<tr>" + "".join(f"<th>{html.escape(c.label)}</th>" for c in cols) + "</tr>", "</thead>"]
    for g, members in groupby(table.methods, key=lambda m: table.groups[m]):
        out.append("<tbody>")
        for i, m in enumerate(members):
            cells = "".join(cell(table, m, c.id) for c in cols)
            out.append(f'<tr class="{"first" if i == 0 else ""}"><td>{html.escape(g) if i == 0 else ""}</td>'
                       f'<td title="{html.escape(m)}">{html.escape(method_title(m))}</td>{cells}</tr>')
        out.append("</tbody>")
    out.append("</table>")
    return out


def render_html(table: "Table", figures: Dict[str, bytes]) -> str:
    """The page; ``figures`` = {file name: PNG bytes} shown in order, inlined as data URLs."""
    from harness.report import comparison_legend, legend

    title = f"Table 1 — {table.sweep}"
    body = [f"<h1>{html.escape(title)}</h1>", *_table(table, _cell, "Downstream performance of the pre-training "
                                                                       "methods (percent)"),
            '<div class="notes">' + "".join(f"<p>{html.escape(n)}</p>" for n in legend(table)) + "</div>"]
    if table.missing:
        body.append("<h2>Missing cells</h2><ul>")
        body += [f"<li>{html.escape(m)} / {html.escape(c)}: {html.escape(why)}</li>" for m, c, why in table.missing]
        body.append("</ul>")
    if table.published is not None:
        body += ["<h2>Reproduced vs published</h2>",
                 *_table(table, _compare_cell, "Reproduced / published (difference), percent"),
                 f'<div class="notes"><p>{html.escape(comparison_legend(table))}</p></div>']
    if figures:
        body.append("<h2>Plots</h2>")
        for name, data in figures.items():
            b64 = base64.b64encode(data).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{html.escape(name)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
