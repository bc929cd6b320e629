"""Table 1 as LaTeX (booktabs): the paper's column groups and row groups, bold and deltas as in the paper.

The output is a ``table`` environment to paste into a paper (preamble: ``\\usepackage{booktabs}``).
Column groups: one ``\\multicolumn`` per dataset over its tasks with a ``\\cmidrule`` under it;
row groups: the group name on the first row of each group and a ``\\midrule`` between groups.
A cell is ``value`` (bold when best of its group and not tied), ``$\\pm$std`` in small type with
several seeds, and the delta against Scratch in small type, marked ``$^{*}$`` when significant.
The legend (the same notes as every other format) becomes the caption.
"""

from __future__ import annotations

from itertools import groupby
from typing import TYPE_CHECKING, Callable, List

if TYPE_CHECKING:  # pragma: no cover
    from harness.report import Table

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_UNICODE = {"±": r"$\pm$", "α": r"$\alpha$", "—": "---", "–": "--", "−": "$-$", "≥": r"$\geq$", "≤": r"$\leq$",
            "Δ": r"$\Delta$", "×": r"$\times$", "*": r"$^{*}$"}


def tex_escape(text: str) -> str:
    """Plain text (with the few unicode signs the legend uses) as LaTeX that pdflatex accepts."""
    out = []
    for ch in str(text):
        if ch in _SPECIAL:
            out.append(_SPECIAL[ch])
        elif ch in _UNICODE:
            out.append(_UNICODE[ch])
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append("?")  # outside what a default pdflatex preamble can typeset
    return "".join(out)


def _cell(table: "Table", method: str, column: str) -> str:
    from harness.report import cell_view

    view = cell_view(table, method, column)
    if view.empty:
        return "--"
    s = rf"\textbf{{{view.value}}}" if view.bold else view.value
    small = []
    if view.std:
        small.append(rf"$\pm${view.std}")
    if view.delta:
        small.append(f"({view.delta.replace('-', '$-$')}" + ("$^{*}$" if view.significant else "") + ")")
    if view.n_note:
        small.append(tex_escape(view.n_note))
    return s + (r"\,{\scriptsize " + " ".join(small) + "}" if small else "")


def _compare_cell(table: "Table", method: str, column: str) -> str:
    from harness.report import compare_view

    ours, pub, diff = compare_view(table, method, column)
    if not ours and not pub:
        return "--"
    s = f"{ours or '--'} / {pub or '--'}"
    return s + (r"\,{\scriptsize (" + diff.replace("-", "$-$") + ")}" if diff else "")


def _tabular(table: "Table", cell: Callable[["Table", str, str], str]) -> List[str]:
    from harness.report import method_title

    cols = table.columns
    lines = [r"\begin{tabular}{ll" + "r" * len(cols) + "}", r"\toprule"]
    spans = [(g, len(list(items))) for g, items in groupby(cols, key=lambda c: c.group)]
    head, rules, at = ["", ""], [], 3
    for g, k in spans:
        head.append(rf"\multicolumn{{{k}}}{{c}}{{{tex_escape(g)}}}")
        rules.append(rf"\cmidrule(lr){{{at}-{at + k - 1}}}")
        at += k
    lines.append(" & ".join(head) + r" \\")
    lines.append(" ".join(rules))
    lines.append(" & ".join(["Group", "Pre-training"] + [tex_escape(c.label) for c in cols]) + r" \\")
    lines.append(r"\midrule")
    last = None
    for m in table.methods:
        g = table.groups[m]
        if last is not None and g != last:
            lines.append(r"\midrule")
        row = [tex_escape(g) if g != last else "", tex_escape(method_title(m))]
        lines.append(" & ".join(row + [cell(table, m, c.id) for c in cols]) + r" \\")
        last = g
    lines += [r"\bottomrule", r"\end{tabular}"]
    return lines


def render_latex(table: "Table") -> str:
    """The paste-ready LaTeX of Table 1 (and of the published comparison when attached)."""
    from harness.report import comparison_legend, legend

    caption = "Downstream performance of the pre-training methods (" + tex_escape(table.sweep) + "). " + \
        " ".join(tex_escape(n) for n in legend(table) if not n.endswith("see the list below."))
    out = [f"% Table 1 of sweep {table.sweep}, written by `harness report`. Preamble: \\usepackage{{booktabs}}",
           r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
           *_tabular(table, _cell), rf"\caption{{{caption}}}", r"\label{tab:table1}", r"\end{table}", ""]
    if table.missing:
        out.insert(1, f"% {len(table.missing)} cells missing (--): see table1.md")
    if table.published is not None:
        out += [r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
                *_tabular(table, _compare_cell), rf"\caption{{{tex_escape(comparison_legend(table))}}}",
                r"\label{tab:table1-published}", r"\end{table}", ""]
    return "\n".join(out)
