"""Benchmarks behind ``make bench`` (not tests): each prints its figures and can write them
under reports/bench/."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator, List, Optional


def emit(lines: List[str], out: Optional[str]) -> None:
    """Print a markdown report and, with ``out``, also write it there."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


@contextlib.contextmanager
def gpu_scheme(table_plans: bool = True) -> Iterator[None]:
    """The GPU's scheme on any device: no coordinate set in buckets, and table plans (or, with
    ``table_plans=False``, one GEMM per kernel offset over all rows, not the CPU's blocks of
    rows), every product a ``torch.mm``. On a GPU this is the default."""
    from unittest import mock

    from harness.backbones import gemm, kernel_map, ops

    with mock.patch.object(kernel_map, "OFFSET_MAJOR_SITES", sys.maxsize), \
            mock.patch.object(ops, "BLOCKED_PRODUCTS_BYTES", sys.maxsize), \
            mock.patch.object(kernel_map, "uses_table_plans", lambda device: table_plans), gemm.using("torch"):
        yield
