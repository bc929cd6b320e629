"""Pieces of the report (``harness.report`` holds the Table and the console/Markdown/CSV renderers).

- :mod:`harness.reporting.stats`: mean +- std, paired t-tests over seeds, Holm, bold without ties.
- :mod:`harness.reporting.published`: the paper's Table 1 as package data, for side-by-side comparison.
- :mod:`harness.reporting.latex`, :mod:`harness.reporting.html`: the LaTeX and HTML renderers.
- :mod:`harness.reporting.plots`: deltas with error bars and training curves (matplotlib, PNG).
"""
