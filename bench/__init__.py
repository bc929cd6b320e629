"""Benchmarks behind ``make bench`` (not tests): each prints its figures and can write them
under reports/bench/."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional


def emit(lines: List[str], out: Optional[str]) -> None:
    """Print a markdown report and, with ``out``, also write it there."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
