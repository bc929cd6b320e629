"""Kernel maps of the torch backend: pure numpy/torch, no compiled extension.

Vocabulary
----------
site        one occupied voxel of a coordinate set: ``(b, x, y, z)`` in voxel units, all four
            integers; at tensor stride ``t`` every spatial coordinate is a multiple of ``t``.
offset i    index into a kernel, in MinkowskiEngine's order: for kernel size k the offset is
            ``(i mod k, (i div k) mod k, i div k^2) - c`` (x fastest), c = 1 for k = 3, 0 for k = 2.
table       ``(n_rows, K)`` int64: ``table[r, i]`` is the input row read through offset i by
            output row r, or -1. Every convolution of Res16UNet is ``out[r] = sum_i
            x[table[r, i]] @ W[i]``, and its input gradient is the same form with the transposed
            table.
plan        a table cut into buckets of rows that share a set of active offsets (their *mask*).
            A bucket of n rows and k offsets runs as one GEMM ``(n, k*C) @ (k*C, C_out)`` on a
            gathered matrix, in chunks of rows (bounded scratch memory, and tasks for the
            worker threads); an offset that is in the bucket's mask but absent for a row reads
            zeros. Merging rare masks into
            supersets trades a few multiplications by zero for fewer, fatter GEMMs (the cost
            model is in :func:`choose_buckets`). An offset that few rows of a bucket have is
            *spilled*: it leaves the bucket's mask and its pairs run offset by offset
            (``Plan.spill``), so the GEMM does not multiply the zeros of all the other rows.
offset plan the same table run offset by offset, unpadded (:class:`OffsetPlan`); small
            coordinate sets on the CPU (the coarse levels) use it instead of buckets.
line plan   the 27 offsets as 9 lines of 3 along x, each site in one exact-mask bucket per line
            it has neighbours on, rows in blocks, the lines' products summed per row
            (:class:`LinePlan`): nothing padded, for large sets whose masks are too varied for
            buckets (real scans at stride 1, ``LINE_PLAN_PADDING``).
table plan  every set off the CPU (a GPU): the whole table as one gather and one GEMM
            (:class:`TablePlan`), all K offsets of every row, absent ones reading zeros. There
            every op is a kernel launch the host must issue, and no worker threads share the
            work: fewest ops beats fewest multiplications (see :func:`uses_table_plans`).

A :class:`CoordinateManager` holds the coordinate sets of one forward pass (one per tensor
stride) and every map between them; each is built once and reused by all layers that need it.
Neighbours are found in torch on the coordinates' device (packed int64 keys, one sort, one
batched binary search for 13 of the 26 neighbours, the other 13 by symmetry); buckets are
chosen and cut in numpy on the CPU. When the manager creates a coarser set it is free to
choose the row order: by bucket of that level's 3x3x3 plan (then by coordinates), so the
stride-1 convolutions write their output as contiguous slices, by block and centre-line mask
for a line plan, or by coordinates for an offset plan.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Offset tables in MinkowskiEngine 0.5.4's kernel order (x fastest), as (K, 3) int64.
KERNEL3 = torch.tensor([[i % 3 - 1, (i // 3) % 3 - 1, i // 9 - 1] for i in range(27)], dtype=torch.int64)
KERNEL2 = torch.tensor([[i % 2, (i // 2) % 2, i // 4] for i in range(8)], dtype=torch.int64)
_KERNEL3_ROWS = KERNEL3.tolist()

# Rows of a chunk times offsets of its bucket: the gathered chunk has CHUNK_ENTRIES * C floats,
# 1 MiB at 32 channels and 4 MiB at 128, per worker. Measured on the 2-core CPU, steps of the
# same model alternating in one process: against 16384, a 100k-voxel step 2-3% faster (two
# runs, 10 and 14 pairs), 300k 2%, 20k 0-1%; 4096 ran like 8192.
CHUNK_ENTRIES = 8192

# Weight-gradient tasks per bucket plan (Plan.pieces).
PIECES_PER_PLAN = 16

# Rows of multiplications that one bucket's share of weight handling costs (see choose_buckets).
WEIGHT_ROWS = 32.0

# Default per-bucket overhead of the cost model, in row-offsets (one row through one offset),
# for layers 64 channels wide; see overhead_for_width.
BUCKET_OVERHEAD = 350.0
MAX_BUCKETS = 256

# Coordinate sets with at most this many sites run their 3x3x3 convolutions offset by offset
# (:class:`OffsetPlan`): there the buckets' padding and weight handling cost more than the
# per-offset GEMMs and the scatter of their results. Measured on the 2-core CPU (Res16UNet34C
# widths, fwd+bwd per convolution): offset-major 1.3-2.7x faster at 360-6k sites, about as fast at 18k,
# 0.6-0.8x at 25k-300k.
OFFSET_MAJOR_SITES = 12000

# An offset present in fewer than this fraction of a bucket's rows is spilled (the centre never
# is): a spilled pair costs one to two padded entries (its own gather, a thinner GEMM, a
# scatter-add). At 100k room voxels the stride-1 set's padding drops from 16% to 6% with 4% of its
# pairs spilled, and a Res16UNet34C step from 4.52 to 4.23 s (A/B medians, 2 threads; 0.5-0.7
# ran alike, 0.8 slower; the buckets' own cost model did not need retuning).
SPILL_BELOW = 0.6

# A 3x3x3 set whose bucket tree would pad its pairs by at least this share (before spilling)
# runs as a line plan instead (:class:`LinePlan`). Mesh vertices at 2 cm (real ScanNet scans)
# leave random holes: 54k distinct masks among 96k sites, the tree pads 74% at stride 1, 41% at
# stride 2; the synthetic rooms 16% and 17%. Measured on the 2-core CPU, convolution fwd+bwd at
# 96 channels, line plan against buckets: real scan stride 1 1.12-1.17x faster, stride 2 0.95-0.99x
# (0.67x at 32 channels); rooms stride 1 0.84-0.90x. Not under autocast: a line plan's GEMMs have
# as many row counts as it has blocks and buckets, and in bf16 each new shape is a new oneDNN
# kernel (real scan at 100k voxels: bf16 step 9.99 s with line plans, 4.56 s with buckets).
LINE_PLAN_PADDING = 0.6

# Pairs per task of a line plan: its rows run in blocks of about this many pairs, at least two.
LINE_BLOCK_PAIRS = 65536

@dataclass
class Bucket:
    """Rows that run as one (chunked) GEMM: ``out[rows] = gather(x, idx) @ W[cols]``."""

    cols: torch.Tensor  # (k,) int64 kernel offsets of the bucket's mask
    start: int  # when rows is None, the rows are start .. start + n
    n: int
    rows: Optional[torch.Tensor]  # (n,) int64 output rows, or None when contiguous
    idx: torch.Tensor  # (n * k,) int64 input rows, row-major; absent entries point at row 0
    step: int  # rows per chunk
    # per chunk (rows c*step ..): positions of absent entries within the chunk's gathered
    # (rows * k) entries, to be zeroed after the gather; None when the chunk has none
    missing: List[Optional[torch.Tensor]] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.cols.numel())


@dataclass
class Plan:
    """A table over ``n_out`` output rows reading ``n_in`` input rows, cut into buckets."""

    n_out: int
    n_in: int
    K: int
    buckets: List[Bucket]
    covers_all: bool  # every output row is in some bucket (else the rest are zero)
    chunks: List[Tuple[int, int, int]] = field(default_factory=list)  # (bucket, r0, r1): one GEMM each
    pieces: List[Tuple[int, int, int]] = field(default_factory=list)  # (bucket, r0, r1): weight-gradient tasks
    # Pairs spilled out of the buckets, run offset by offset; ``spill_t`` holds the same pairs
    # transposed (rows swapped, offset i -> K-1-i), which the symmetric backward needs.
    spill: Optional["OffsetPlan"] = None
    spill_t: Optional["OffsetPlan"] = None

    def __post_init__(self) -> None:
        self.max_rows = max((b.step if b.n > b.step else b.n for b in self.buckets), default=0)
        self.max_entries = max(((b.step if b.n > b.step else b.n) * b.k for b in self.buckets), default=0)
        if not self.chunks:
            self.chunks = [(i, r0, min(b.n, r0 + b.step)) for i, b in enumerate(self.buckets)
                           for r0 in range(0, b.n, b.step)]
        if not self.pieces:
            # Weight-gradient tasks accumulate several chunks of one bucket, a whole number of
            # chunks each; about PIECES_PER_PLAN per plan, so that the workers balance.
            target = max(CHUNK_ENTRIES, self.n_entries // PIECES_PER_PLAN)
            for i, b in enumerate(self.buckets):
                rows = -(-max(target // max(b.k, 1), 1) // b.step) * b.step
                self.pieces += [(i, r0, min(b.n, r0 + rows)) for r0 in range(0, b.n, rows)]

    @property
    def n_entries(self) -> int:
        """Row-offsets actually multiplied, zeros included (for FLOP counts)."""
        return sum(b.n * b.k for b in self.buckets) + (self.spill.n_entries if self.spill is not None else 0)

    @property
    def n_chunks(self) -> int:
        return sum(-(-b.n // b.step) for b in self.buckets)


@dataclass
class OffsetPlan:
    """A table run offset by offset, unpadded (MinkowskiEngine's scheme): for each offset i
    with pairs, ``x[in_rows] @ W[i]`` added at ``out_rows`` (positions ``seg[j]..seg[j + 1]``
    hold the pairs of ``offsets[j]``, most pairs first). When the ``centre`` offset reads every
    output row's own input row (3x3x3, stride 1) it runs as one plain product, no gather. The
    input gradient uses the same pairs with the rows swapped."""

    n_out: int
    n_in: int
    K: int
    centre: Optional[int]
    offsets: List[int]
    seg: List[int]
    out_rows: torch.Tensor  # (P,) int64
    in_rows: torch.Tensor  # (P,) int64

    @classmethod
    def from_table(cls, table: torch.Tensor, n_in: int, centre: Optional[int] = None) -> "OffsetPlan":
        """From a (n_out, K) int64 table (-1 = absent), on the table's device; ``centre`` must
        read row r at row r."""
        n_out, K = table.shape
        present = table >= 0
        if centre is not None:
            present[:, centre] = False
        rows, offs = torch.nonzero(present).unbind(1)
        return cls.from_pairs(int(n_out), int(n_in), int(K), rows, offs, table[rows, offs], centre)

    @classmethod
    def from_pairs(cls, n_out: int, n_in: int, K: int, out_rows: torch.Tensor, offs: torch.Tensor,
                   in_rows: torch.Tensor, centre: Optional[int] = None) -> "OffsetPlan":
        """From pairs in any order: output row ``out_rows[p]`` reads input row ``in_rows[p]``
        through offset ``offs[p]`` (int64 tensors on one device; the centre's are not pairs)."""
        counts = torch.bincount(offs, minlength=K).tolist()
        offsets = sorted((i for i in range(K) if counts[i] > 0), key=lambda i: -counts[i])  # stable
        seg = [0]
        for i in offsets:
            seg.append(seg[-1] + counts[i])
        rank = torch.zeros(K, dtype=torch.int64, device=offs.device)
        rank[offsets] = torch.arange(len(offsets), device=offs.device)
        order = torch.argsort(rank[offs] * max(n_out, 1) + out_rows)  # by offset, then output row
        return cls(n_out, n_in, K, centre, offsets, seg, out_rows[order].contiguous(), in_rows[order].contiguous())

    @property
    def n_entries(self) -> int:
        """Row-offsets multiplied (all of them useful)."""
        return (self.n_out if self.centre is not None else 0) + int(self.seg[-1])

    @property
    def counts(self) -> List[int]:
        """Pairs of each of ``offsets``."""
        return [b - a for a, b in zip(self.seg[:-1], self.seg[1:])]

    @property
    def max_pairs(self) -> int:
        return max(self.counts, default=0)

    @functools.cached_property
    def out_touched(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(distinct output rows, each pair's position among them): lets a half-precision
        scatter add in float32 on the rows it touches only."""
        return torch.unique(self.out_rows, return_inverse=True)

    @functools.cached_property
    def in_touched(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :attr:`out_touched`, for the input rows (the input gradient's scatter)."""
        return torch.unique(self.in_rows, return_inverse=True)

    def row_blocks(self, side: str, n_blocks: int) -> Optional[Tuple[List[int], List[List[int]]]]:
        """The rows of ``side`` ("out" or "in") cut into ``n_blocks`` ranges of about equal
        work (pairs, plus the centre's row each): ``(bounds, cuts)``, block t holding rows
        ``bounds[t] .. bounds[t + 1]`` and, of the pairs of ``offsets[j]``, positions
        ``cuts[j][t] .. cuts[j][t + 1]``. None unless that side's rows increase within each
        offset's pairs (they do in a set kept in coordinate order, where a fixed offset keeps
        the order; not in a bucket plan's spill). Made once per side and block count."""
        memo = self.__dict__.setdefault("_row_blocks", {})
        if (side, n_blocks) not in memo:
            memo[(side, n_blocks)] = self._cut_rows(side, n_blocks)
        return memo[(side, n_blocks)]

    def _cut_rows(self, side: str, n_blocks: int) -> Optional[Tuple[List[int], List[List[int]]]]:
        rows, n = (self.out_rows, self.n_out) if side == "out" else (self.in_rows, self.n_in)
        if not self.offsets or n == 0:
            return None
        dev = rows.device
        segment = torch.repeat_interleave(torch.arange(len(self.offsets), device=dev),
                                          torch.tensor(self.counts, device=dev))
        key = segment * n + rows  # increasing iff rows increase within each segment
        if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
            return None
        work = torch.cumsum(torch.bincount(rows, minlength=n) + (1 if self.centre is not None else 0), 0)
        targets = work[-1] * torch.arange(1, n_blocks, device=dev) // n_blocks
        bounds = [0] + torch.searchsorted(work, targets, right=True).tolist() + [n]
        firsts = torch.arange(len(self.offsets), device=dev)[:, None] * n + torch.tensor(bounds, device=dev)[None, :]
        return bounds, torch.searchsorted(key, firsts).tolist()


@dataclass
class TablePlan:
    """A table run whole, for a GPU: one gather and one GEMM. The gather is channel-major:
    ``cols[c * K + i, r] = x[table[r, i], c]`` as a (C * K, n_out) matrix, zeros where absent,
    and ``out = cols^T @ W`` with the weight's rows in (channel, offset) order. Gathering each
    channel's values as 4-byte elements, from the transposed (C, n_in) features, ran 2.3x (96
    channels) to 5.9x (32 channels) faster on an H200 than gathering whole feature rows (one
    step at 100k room voxels: ``index_select`` on rows 1.65 ms against 0.70 ms at 96 channels,
    0.43 against 0.07 ms at 32). Every zero is multiplied: at 100k room voxels 11 of a site's
    27 offsets are present.
    A plan with one entry per output row (``select``; the transposed convolution's, fine rows
    reading their parent) runs the other way round: all K products of every input row,
    ``x @ W`` as (n_in, K * C_out), then each output row picks its one. Input and weight
    gradients are the same two forms (see :func:`~.ops.table_backward`)."""

    n_out: int
    n_in: int
    K: int
    # (K * n_out,) int64 input rows, offset-major (entry i * n_out + r: row r's neighbour through
    # offset i); absent entries read column n_in (zeros). None where ``select`` is given (a
    # select plan never gathers)
    index: Optional[torch.Tensor]
    select: Optional[torch.Tensor]  # (n_out,) int64 in_row * K + offset of each row's one entry, or None

    @classmethod
    def from_table(cls, table: torch.Tensor, n_in: int) -> "TablePlan":
        """A gathering plan from a (n_out, K) int64 table (-1 = absent) on its device (a
        select plan is built directly: see :class:`DownMap`)."""
        n_out, K = table.shape
        return cls(int(n_out), int(n_in), int(K), torch.where(table >= 0, table, n_in).t().reshape(-1), None)

    @property
    def n_entries(self) -> int:
        """Row-offsets multiplied, zeros included (for FLOP counts)."""
        return (self.n_in if self.select is not None else self.n_out) * self.K

    @functools.cached_property
    def index_mirrored(self) -> torch.Tensor:
        """``index`` with its offsets reversed: for a stride-1 kernel, the transposed table
        (site s reaches r through offset i exactly when r reaches s through K-1-i)."""
        return self.index.view(self.K, self.n_out).flip(0).reshape(-1)


@dataclass
class LineBucket:
    """The rows of a line plan whose line ``line`` holds the offsets ``cols`` (ascending, one to
    three of ``3 * line + 0..2``): ``out[rows] += x[idx] @ W[cols]`` as one GEMM per block."""

    line: int
    cols: List[int]
    rows: torch.Tensor  # (n,) int64 output rows, ascending
    idx: torch.Tensor  # (n * k,) int64 input rows, row-major
    bounds: List[int]  # rows[bounds[t]:bounds[t + 1]] lie in block t
    starts: Optional[List[int]]  # the centre line's: block t's rows are starts[t] .. + their count

    @property
    def k(self) -> int:
        return len(self.cols)

    @property
    def consecutive(self) -> bool:
        """Whether ``cols`` are consecutive offsets (every sub-mask but 101), so that their
        weights, and their weight-gradient rows, are one slice."""
        return self.cols[-1] - self.cols[0] == self.k - 1


@dataclass
class LinePlan:
    """A symmetric 3x3x3 table run without padding: its 27 offsets as 9 lines of 3 along x
    (offsets ``3 * line + 0..2``). Each row is in one bucket per line it has a neighbour on,
    the bucket of its exact sub-mask (at most 7 per line, none padded), so a row's output sums
    over its lines. Rows run in blocks (tasks for the worker threads, each writing its own
    rows, so no two tasks add into one row): per block and bucket one gather, one GEMM and an
    ``index_add_`` of its rows. The centre line (``CENTRE_LINE``) comes first and covers every
    row; within a block its buckets' rows are contiguous (the row order is chosen so), and it
    writes them with the GEMM directly. Built for sets whose masks are too varied for buckets
    (see ``LINE_PLAN_PADDING``)."""

    n: int
    buckets: List[LineBucket]  # the centre line's first
    n_blocks: int
    max_rows: int  # most rows of one bucket in one block
    K: int = 27

    CENTRE_LINE = 4

    @classmethod
    def build(cls, table: np.ndarray, block_pairs: Optional[int] = None) -> Tuple["LinePlan", np.ndarray, np.ndarray]:
        """(plan, perm, table in the new row order) from an (n, 27) table whose rows are in
        coordinate order (neighbours close in memory): rows move to ``perm`` order (new row r
        was row perm[r]): by block, then by the centre line's sub-mask, then as they were."""
        n = len(table)
        present = table >= 0
        n_blocks = max(2, int(present.sum()) // (block_pairs or LINE_BLOCK_PAIRS))
        size = -(-n // n_blocks)
        c = 3 * cls.CENTRE_LINE
        centre_class = present[:, c] * 1 + present[:, c + 2] * 2
        perm = np.argsort((np.arange(n) // size) * 4 + centre_class, kind="stable")
        inv = np.empty_like(perm)
        inv[perm] = np.arange(n)
        table = table[perm]
        table = np.where(table >= 0, inv[np.maximum(table, 0)], -1)
        present = present[perm]
        edges = np.minimum(np.arange(n_blocks + 1) * size, n)
        buckets: List[LineBucket] = []
        max_rows = 0
        for line in [cls.CENTRE_LINE] + [g for g in range(9) if g != cls.CENTRE_LINE]:
            sub = present[:, 3 * line] * 1 + present[:, 3 * line + 1] * 2 + present[:, 3 * line + 2] * 4
            for m in range(1, 8):
                rows = np.flatnonzero(sub == m)
                if len(rows) == 0:
                    continue
                cols = [3 * line + i for i in range(3) if m >> i & 1]
                bounds = np.searchsorted(rows, edges)
                max_rows = max(max_rows, int(np.diff(bounds).max()))
                starts = rows[np.minimum(bounds[:-1], len(rows) - 1)].tolist() if line == cls.CENTRE_LINE else None
                buckets.append(LineBucket(line, cols, torch.from_numpy(rows), torch.from_numpy(
                    np.ascontiguousarray(table[rows][:, cols]).reshape(-1)), bounds.tolist(), starts))
        return cls(n, buckets, n_blocks, max_rows), perm, table

    @property
    def n_entries(self) -> int:
        """Row-offsets multiplied (all of them useful)."""
        return sum(b.rows.numel() * b.k for b in self.buckets)


def uses_table_plans(device) -> bool:
    """Whether coordinate sets on ``device`` get :class:`TablePlan`: off the CPU. Measured on an
    H200 and an H100 (bench/gpu_sweep.py, Res16UNet34C fwd+bwd, room voxels, fp32, steps
    interleaved in one process), against the scheme before them, offset plans whose offsets
    ran in a few padded batched GEMMs per convolution: at 100k voxels 86 against 159-167 ms (H200)
    and 72-80 against 150-163 ms (H100); 20k 40-50 against 65-83 ms, 300k 181-213 against
    354-378 ms. That scheme's host issued 4,900 ops per step (table plans: 2,100), and its
    per-offset weight-gradient GEMMs, (C, L) x (L, C) with L ~ 100k, left the GPU nearly idle."""
    return torch.device(device).type != "cpu"


def unbucketed_plan(table: torch.Tensor, n_in: int, centre: Optional[int] = None) -> "OffsetPlan | TablePlan":
    """The plan of a set that runs without buckets: a table plan where the device uses them,
    else an offset plan (``centre``: the offset that reads each row's own row)."""
    if uses_table_plans(table.device):
        return TablePlan.from_table(table, n_in)
    return OffsetPlan.from_table(table, n_in, centre)


def choose_buckets(masks: torch.Tensor, K: int, overhead: float = BUCKET_OVERHEAD,
                   max_buckets: int = MAX_BUCKETS, weight_rows: float = WEIGHT_ROWS) -> Tuple[np.ndarray, np.ndarray]:
    """Group rows by offset mask; returns ``(bucket_of_row (n,), bucket_masks (B,))`` (numpy).

    A bucket's mask is the union of its rows' masks and it costs (rows + ``weight_rows``) x
    popcount(mask) + ``overhead`` row-offsets: each bucket also slices, packs and (backward)
    accumulates its own (k, C, C_out) block of the weight, which costs about as much as
    ``weight_rows`` rows of multiplications and dominates at the coarse levels. Surfaces give thousands of distinct 27-bit masks with a long
    tail (on room scans the most frequent mask covers about a third of the sites, the top 50
    about 60%), so exact-mask buckets are too many and a catch-all bucket wastes a third of
    its multiplications. Instead the rows are split greedily like a decision tree: a bucket is
    cut into (offset absent, offset present) on the offset that saves the most padded entries,
    always cutting the bucket with the largest saving, while a cut saves more than
    ``overhead`` and there are fewer than ``max_buckets`` buckets. One cut is one (K x K)
    product over the bucket's distinct masks (for one of two siblings; the other's is the
    parent's minus it). The tree runs in numpy: small single-threaded ops do not stall when
    another job holds a core, as OpenMP-parallel torch ops do. The distinct masks come from
    one ``torch.unique`` (1.4 ms on 100k masks; ``np.unique`` took 11 ms).
    """
    m = masks.cpu() if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
    uniq, inv, cnt = (t.numpy() for t in torch.unique(m.reshape(-1), sorted=True, return_inverse=True,
                                                      return_counts=True))
    bits = ((uniq[:, None] >> np.arange(K)) & 1).astype(np.float64)  # (U, K)
    w = cnt.astype(np.float64)

    def pair_counts(idx: np.ndarray) -> np.ndarray:
        """(K, K): [j, i] = rows of the node that have bits j and i (the diagonal: bit j)."""
        b = bits[idx]
        return b.T @ (b * w[idx, None])

    def best_cut(s: np.ndarray, n: float) -> Tuple[float, int]:
        tot = np.diagonal(s)
        cost0 = n * float((tot > 0).sum())
        on_width = (s > 0).sum(1)
        off_width = ((tot[None, :] - s) > 0.5).sum(1)
        cost = (n - tot) * off_width + tot * on_width
        cost[(tot <= 0) | (tot >= n)] = np.inf
        j = int(np.argmin(cost))
        return cost0 - float(cost[j]), j

    # Grow: best-first cuts on padding saved alone (a single cut often saves little while
    # the cuts below it save a lot, so the per-bucket costs are left to the pruning). A node
    # keeps its rows, row count, mask and (while it may be cut) its pair counts; of two
    # siblings only the one with fewer distinct masks is counted (integers in float64: the
    # difference is exact).
    nodes: List[dict] = [{"idx": np.arange(len(uniq)), "n": float(w.sum()), "mask": int(np.bitwise_or.reduce(uniq)),
                          "kids": None}]
    heap: List[Tuple[float, int, int]] = []
    if len(uniq) > 1:
        nodes[0]["s"] = pair_counts(nodes[0]["idx"])
        gain, j = best_cut(nodes[0]["s"], nodes[0]["n"])
        heap.append((-gain, 0, j))
    n_leaves = 1
    while heap and n_leaves < max_buckets:
        neg_gain, node, j = heapq.heappop(heap)
        if -neg_gain <= 0:
            break
        parent = nodes[node]
        idx = parent["idx"]
        on = bits[idx, j] > 0
        parts = (idx[~on], idx[on])
        small = 0 if len(parts[0]) <= len(parts[1]) else 1
        counts = [None, None]
        counts[small] = pair_counts(parts[small])
        counts[1 - small] = parent.pop("s") - counts[small]
        kids = []
        for part, s_part in zip(parts, counts):
            n_part = float(w[part].sum())
            nodes.append({"idx": part, "n": n_part, "mask": int(np.bitwise_or.reduce(uniq[part])), "kids": None})
            kids.append(len(nodes) - 1)
            # A bucket of fewer than 2 * weight_rows rows seldom pays for its weight handling.
            if len(part) > 1 and n_part >= 2 * weight_rows:
                nodes[-1]["s"] = s_part
                gain, jj = best_cut(s_part, n_part)
                heapq.heappush(heap, (-gain, len(nodes) - 1, jj))
        parent["kids"] = kids
        n_leaves += 1

    # Prune bottom-up: keep a subtree only where its leaves cost less than the node as one
    # bucket, counting (rows + weight_rows) x width + overhead per bucket.
    def prune(node: int) -> Tuple[float, List[dict]]:
        nd = nodes[node]
        here = (nd["n"] + weight_rows) * bin(nd["mask"]).count("1") + overhead
        if nd["kids"] is None:
            return here, [nd]
        total, leaves_ = 0.0, []
        for kid in nd["kids"]:
            c, lv = prune(kid)
            total += c
            leaves_ += lv
        return (total, leaves_) if total < here else (here, [nd])

    leaves = sorted(prune(0)[1], key=lambda nd: -nd["n"])
    bucket_of_uniq = np.empty(len(uniq), dtype=np.int64)
    for b, nd in enumerate(leaves):
        bucket_of_uniq[nd["idx"]] = b
    bucket_masks = np.array([nd["mask"] for nd in leaves], dtype=np.int64)
    return bucket_of_uniq[inv], bucket_masks


def overhead_for_width(width: int) -> float:
    """Per-bucket overhead in row-offsets for layers about ``width`` channels wide: one
    bucket costs some 60 us of dispatch over forward and backward, a row-offset
    6 * width^2 FLOP at about 145 GFLOP/s (measured on the 2-core CPU)."""
    return 60e-6 * 145e9 / (6.0 * width * width)


def build_plan(table: torch.Tensor, n_in: int, bucket_of_row: np.ndarray, bucket_masks: np.ndarray,
               contiguous: bool, device: Optional[torch.device] = None, spill_below: float = 0.0,
               centre: Optional[int] = None) -> Plan:
    """Cut ``table`` (n_out, K) into the given buckets (index work in numpy, tensors on the
    table's device). With ``contiguous`` the rows must already be sorted by bucket, and each
    bucket is a slice of the output. Offsets other than ``centre`` present in fewer than
    ``spill_below`` of a bucket's rows are spilled (a symmetric kernel only: the transposed
    pairs of ``Plan.spill_t`` assume n_in == n_out and offset K-1-i opposite offset i)."""
    dev = table.device if device is None else device
    tab = table.cpu().numpy()
    n_out, K = tab.shape
    counts = np.bincount(bucket_of_row, minlength=len(bucket_masks))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = None if contiguous else np.argsort(bucket_of_row, kind="stable")

    def to_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    buckets: List[Bucket] = []
    spilled: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (out rows, offsets, in rows)
    for b, m in enumerate(bucket_masks.tolist()):
        n, start = int(counts[b]), int(starts[b])
        if n == 0:
            continue
        cols = np.flatnonzero((m >> np.arange(K)) & 1)
        rows = None if contiguous else order[start:start + n]
        where = slice(start, start + n) if contiguous else rows
        sub = tab[where]
        if spill_below > 0:
            rare = ((sub[:, cols] >= 0).mean(axis=0) < spill_below) & (cols != centre)
            if rare.any() and not rare.all():
                r, c = np.nonzero(sub[:, cols[rare]] >= 0)
                spilled.append((start + r if contiguous else rows[r], cols[rare][c], sub[r, cols[rare][c]]))
                cols = cols[~rare]
        k = len(cols)
        sub = sub[:, cols]
        absent = sub < 0
        idx = np.where(absent, 0, sub).reshape(-1)
        step = max(64, CHUNK_ENTRIES // max(k, 1))
        flat_missing = np.flatnonzero(absent)
        missing: List[Optional[torch.Tensor]] = []
        for r0 in range(0, n, step):
            lo, hi = np.searchsorted(flat_missing, [r0 * k, min(n, r0 + step) * k])
            missing.append(to_dev(flat_missing[lo:hi] - r0 * k) if hi > lo else None)
        buckets.append(Bucket(to_dev(cols), start if contiguous else 0, n,
                              None if rows is None else to_dev(rows), to_dev(idx), step, missing))
    plan = Plan(n_out, n_in, K, buckets, covers_all=int(counts.sum()) == n_out)
    if spilled:
        q, j, s = (to_dev(np.concatenate(parts)) for parts in zip(*spilled))
        plan.spill = OffsetPlan.from_pairs(n_out, n_in, K, q, j, s)
        plan.spill_t = OffsetPlan.from_pairs(n_in, n_out, K, s, K - 1 - j, q)
    return plan


@functools.lru_cache(maxsize=256)
def _const(values: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int64 tensor of ``values`` on ``device``, made once per process and never written:
    off the CPU, making one is a host-to-device copy the step would otherwise repeat."""
    return torch.tensor(values, dtype=torch.int64, device=device)


class _Packer:
    """Packs lattice coordinates ``(b, u, v, w)`` into sortable int64 keys with a margin of one
    lattice step on every side, so that a neighbour's key is the site's key plus a constant."""

    def __init__(self, lattice: torch.Tensor):
        lo_hi = torch.cat(torch.aminmax(lattice, dim=0)).tolist()
        lo, hi = lo_hi[:4], lo_hi[4:]
        lo[1:] = [v - 1 for v in lo[1:]]
        self.lo = lo
        self.ext = [h - l + 1 + (1 if d else 0) for d, (l, h) in enumerate(zip(lo, hi))]
        if math.prod(float(e) for e in self.ext) >= 2.0**62:
            raise ValueError(f"coordinate extent {self.ext} too large to pack into int64 keys")

    def keys(self, lattice: torch.Tensor) -> torch.Tensor:
        """Row-major keys over the extents: each term is below its extent, so the sum stays below
        their product (< 2^62). Three whole-tensor ops (off the CPU each op is a launch)."""
        e = self.ext
        dev = lattice.device
        mult = _const((e[1] * e[2] * e[3], e[2] * e[3], e[3], 1), dev)
        return ((lattice - _const(tuple(self.lo), dev)) * mult).sum(dim=1)

    def delta(self, d: List[int]) -> int:
        e = self.ext
        return (d[0] * e[2] + d[1]) * e[3] + d[2]


# Column of offset 26 - i for i = 0..12: the mirror of each of the 13 offsets searched.
_MIRROR_COLUMNS = tuple(range(26, 13, -1))


def _neighbour_deltas(packer: _Packer, device: torch.device) -> torch.Tensor:
    """Key differences of kernel offsets 0..12 (the other 13 are their mirrors)."""
    return torch.tensor([packer.delta(d) for d in _KERNEL3_ROWS[:13]], dtype=torch.int64, device=device)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``_inverse(p)[p[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv


def _lattice(coords: torch.Tensor, step: int) -> torch.Tensor:
    """Coordinates with the spatial part floored to multiples of ``step``, in units of ``step``
    (floor also below zero, as MinkowskiEngine); ``coords`` itself for step 1."""
    if step == 1:
        return coords
    return torch.div(coords, _const((1, step, step, step), coords.device), rounding_mode="floor")


class Level:
    """One coordinate set at tensor stride ``stride``, with its 3x3x3 neighbour plan.

    The neighbour search runs in torch on the coordinates' device (one sort, one batched
    binary search of packed keys for 13 neighbours, the other 13 by symmetry); choosing and
    cutting buckets runs in numpy on the CPU.
    """

    def __init__(self, coords: torch.Tensor, stride: int, order_fixed: bool, device: torch.device,
                 overhead: float = BUCKET_OVERHEAD, keep_table: bool = False,
                 offset_major_sites: int = OFFSET_MAJOR_SITES,
                 sorted_keys: Optional[Tuple["_Packer", torch.Tensor]] = None):
        # coords (N, 4) int64 on device; spatial coordinates are multiples of stride.
        # ``sorted_keys``: a packer and the rows' keys, when the rows come sorted by them (a
        # coarse set from CoordinateManager.down_map, which has packed and sorted them already).
        self.stride = stride
        self.device = device
        sorder: Optional[torch.Tensor] = None  # sorted position -> row; None: rows are in key order
        if sorted_keys is None:
            lattice = _lattice(coords, stride)
            packer = _Packer(lattice)
            skeys, sorder = torch.sort(packer.keys(lattice), stable=True)
        else:
            packer, skeys = sorted_keys
        n = coords.shape[0]
        offset_major = n <= offset_major_sites
        # Neighbour table over sorted positions first; rows move once at the end. All 13
        # searches run as one batch of ops (on a GPU each op is a kernel launch), and a spare
        # row n takes the writes of sites without the neighbour (no nonzero(): on a GPU it
        # would wait for the device).
        q = skeys[None, :] + _neighbour_deltas(packer, device)[:, None]  # (13, n): key of neighbour i
        pos = torch.searchsorted(skeys, q).clamp_(max=n - 1)
        hit = skeys[pos] == q
        if sorted_keys is None:  # one wait for the device (off the CPU) for both counts
            n_dup, n_hits = torch.stack([(skeys[1:] == skeys[:-1]).sum(), hit.sum()]).tolist()
        else:  # unique keys already: no duplicates to look for
            n_dup, n_hits = 0, int(hit.sum())
        if n_dup:
            row = int(sorder[int(torch.nonzero(skeys[1:] == skeys[:-1])[0, 0]) + 1])
            raise ValueError(f"duplicate coordinate {coords[row].tolist()} (row {row}); sites must be unique "
                             "(voxelize the points first)")
        rows = torch.arange(n, device=device)
        tab = torch.full((n + 1, 27), -1, dtype=torch.int64, device=device)
        tab[:n, 13] = rows
        tab[:n, :13] = torch.where(hit, pos, -1).t()  # r + d_i = pos
        mirror = _const(_MIRROR_COLUMNS, device)[:, None].expand(13, n)
        tab[torch.where(hit, pos, n), mirror] = rows.expand(13, n)  # pos - d_i = r
        tab = tab[:n]
        n_pairs = n + 2 * n_hits
        self.perm: Optional[torch.Tensor] = None  # new row r was old row perm[r]
        if order_fixed and sorder is not None:  # back to the input's row order
            table = torch.empty_like(tab)
            table[sorder] = torch.where(tab >= 0, sorder[tab], -1)
        else:  # coordinate order (kept for an offset plan: neighbours stay close in memory)
            table, self.perm = tab, sorder
        if offset_major:
            plan: "Plan | OffsetPlan | TablePlan" = unbucketed_plan(table, n, centre=13)
        else:
            # the offsets present at each site, as bits
            masks = ((table >= 0).to(torch.int64) << torch.arange(27, device=device)).sum(dim=1)
            table, plan, by_bucket = self._bucketed(table.cpu().numpy(), masks.cpu().numpy(), order_fixed, overhead,
                                                    device)
            table = torch.from_numpy(table)
            if by_bucket is not None:
                by_bucket = torch.from_numpy(by_bucket).to(device)
                self.perm = by_bucket if self.perm is None else self.perm[by_bucket]
        self.coords = coords if self.perm is None else coords[self.perm]
        self.n = n
        self.n_pairs = n_pairs  # (site, neighbour) pairs, the centre included
        self.table: Optional[torch.Tensor] = table if keep_table else None  # (n, 27) neighbour rows, -1 absent
        self.plan = plan

    @staticmethod
    def _bucketed(table: np.ndarray, masks: np.ndarray, order_fixed: bool, overhead: float, device: torch.device):
        """(table, plan, new row order or None): unless the order is fixed, rows move to
        bucket by bucket order, keeping their order inside a bucket; or, where the buckets would
        pad too much (``LINE_PLAN_PADDING``) and autocast is off, a line plan in its own row
        order."""
        n = len(table)
        bucket_of_row, bucket_masks = choose_buckets(masks, 27, overhead=overhead)
        if not order_fixed and not torch.is_autocast_enabled(torch.device(device).type):
            widths = np.array([bin(m).count("1") for m in bucket_masks.tolist()])
            padded = int((np.bincount(bucket_of_row, minlength=len(widths)) * widths).sum())
            if padded >= (1.0 + LINE_PLAN_PADDING) * int((table >= 0).sum()):
                plan, perm, table = LinePlan.build(table)
                return table, plan, perm
        by_bucket = None
        if not order_fixed:
            by_bucket = np.argsort(bucket_of_row, kind="stable")
            inv = np.empty_like(by_bucket)
            inv[by_bucket] = np.arange(n)
            table = table[by_bucket]
            table = np.where(table >= 0, inv[table], -1)
            bucket_of_row = bucket_of_row[by_bucket]
        plan = build_plan(torch.from_numpy(table), n, bucket_of_row, bucket_masks, contiguous=not order_fixed,
                          device=device, spill_below=SPILL_BELOW, centre=13)
        return table, plan, by_bucket

    def coords_tensor(self) -> torch.Tensor:
        return self.coords.to(torch.int32)

    def stats(self) -> Dict[str, float]:
        active = self.n_pairs
        return {"sites": self.n, "neighbours": active / max(self.n, 1),
                "buckets": len(self.plan.buckets) if isinstance(self.plan, (Plan, LinePlan)) else 0,
                "padding": self.plan.n_entries / max(active, 1) - 1.0}


class DownMap:
    """Kernel-2 stride-2 map from a fine level (stride t) to the coarse level (stride 2t).

    ``down`` is over coarse rows (``out[c] = sum_i fine[table[c, i]] @ W[i]``), ``up`` over
    fine rows, exactly one entry each (``out[p] = coarse[parent[p]] @ W[offset[p]]``). Both run
    offset by offset when ``offsets`` (the scheme of the fine set's size), else in buckets.
    """

    def __init__(self, fine: Level, coarse: Level, parent: torch.Tensor, child_offset: torch.Tensor,
                 device: torch.device, overhead: float = BUCKET_OVERHEAD, offsets: bool = False):
        nf, nc = fine.n, coarse.n
        fine_rows = torch.arange(nf, device=device)
        self.parent = parent
        self.child_offset = child_offset
        self.down: "Plan | OffsetPlan | TablePlan"
        self.up: "Plan | OffsetPlan | TablePlan"
        if offsets and uses_table_plans(device):
            # built directly, in a few ops (each one a launch there), offset-major: absent
            # entries read column nf, the zeros; each fine row's one entry is parent * 8 + offset
            index = torch.full((8, nc), nf, dtype=torch.int64, device=device)
            index[child_offset, parent] = fine_rows
            self.down = TablePlan(nc, nf, 8, index.view(-1), None)
            self.up = TablePlan(nf, nc, 8, None, parent * 8 + child_offset)
            return
        table = torch.full((nc, 8), -1, dtype=torch.int64, device=device)
        table[parent, child_offset] = fine_rows
        up_table = torch.full((nf, 8), -1, dtype=torch.int64, device=device)
        up_table[fine_rows, child_offset] = parent
        if offsets:
            self.down = OffsetPlan.from_table(table, nf)
            self.up = OffsetPlan.from_table(up_table, nc)
            return
        table, up_table = table.cpu(), up_table.cpu()
        masks = ((table >= 0).to(torch.int64) << torch.arange(8)).sum(dim=1)
        bucket_of_row, bucket_masks = choose_buckets(masks, 8, overhead=overhead)
        self.down = build_plan(table, nf, bucket_of_row, bucket_masks, contiguous=False, device=device)
        self.up = build_plan(up_table, nc, child_offset.cpu().numpy(), np.ones(8, dtype=np.int64) << np.arange(8),
                             contiguous=False, device=device)


def default_offset_major_sites(device: torch.device) -> int:
    """Largest coordinate set that runs offset by offset on ``device``: buckets pay off only
    with the CPU's worker threads; elsewhere each chunk would be a few small kernel launches."""
    return OFFSET_MAJOR_SITES if torch.device(device).type == "cpu" else sys.maxsize


class CoordinateManager:
    """The coordinate sets and kernel maps of one forward pass.

    ``coords`` (N, 4) integer tensor (batch index, x, y, z) of unique sites at stride 1. With
    ``reorder=True`` the manager may permute the input rows (``perm``: new row r is input row
    perm[r]); callers then permute features with :meth:`to_internal` and restore the input
    order with :meth:`to_input_order`. ``widths`` (tensor stride -> typical channel count of
    the layers there) sets the per-bucket overhead of the bucketing cost model: wide layers
    afford more, smaller buckets. Sets of at most ``offset_major_sites`` sites (default
    ``OFFSET_MAJOR_SITES`` on the CPU, every set elsewhere) get a plan without buckets instead
    (:func:`unbucketed_plan`: a :class:`TablePlan` off the CPU, else an :class:`OffsetPlan`),
    and so do the stride-2 maps from them.
    """

    def __init__(self, coords: torch.Tensor, reorder: bool = True, widths: Optional[Dict[int, int]] = None,
                 stride: int = 1, keep_tables: bool = False, offset_major_sites: Optional[int] = None):
        self.widths = dict(widths or {})
        self.device = coords.device
        self.offset_major_sites = int(default_offset_major_sites(self.device) if offset_major_sites is None
                                      else offset_major_sites)
        self.keep_tables = keep_tables
        self.base_stride = int(stride)
        c = coords.detach().to(torch.int64)
        if self.base_stride < 1:
            raise ValueError(f"tensor stride must be >= 1, got {stride}")
        if self.base_stride > 1 and bool((c[:, 1:] % self.base_stride).any()):
            raise ValueError(f"coordinates at tensor stride {stride} must be multiples of {stride}")
        base = Level(c, self.base_stride, order_fixed=not reorder, device=self.device,
                     overhead=self.overhead(self.base_stride), keep_table=keep_tables,
                     offset_major_sites=self.offset_major_sites)
        self.perm = self.inv_perm = None
        if base.perm is not None:
            self.perm, self.inv_perm = base.perm, _inverse(base.perm)
        self.levels: Dict[int, Level] = {self.base_stride: base}
        self.down_maps: Dict[int, DownMap] = {}

    def overhead(self, stride: int) -> float:
        return overhead_for_width(self.widths.get(stride, 64))

    def to_internal(self, feats: torch.Tensor) -> torch.Tensor:
        return feats if self.perm is None else feats.index_select(0, self.perm)

    def to_input_order(self, feats: torch.Tensor) -> torch.Tensor:
        return feats if self.inv_perm is None else feats.index_select(0, self.inv_perm)

    def level(self, stride: int) -> Level:
        if stride not in self.levels:
            if stride % 2 or stride < 2 * self.base_stride:
                raise ValueError(f"no coordinate set at tensor stride {stride}")
            self.down_map(stride // 2)
        return self.levels[stride]

    def down_map(self, stride: int) -> DownMap:
        """The map from stride ``stride`` to ``2 * stride`` (creating the coarse set if needed)."""
        if stride in self.down_maps:
            return self.down_maps[stride]
        fine = self.level(stride)
        t2 = 2 * stride
        fc = fine.coords
        lat = _lattice(fc, t2)
        # the kernel-2 offset of each fine site inside its parent: the parities of its lattice
        # coordinates at the fine stride (x fastest, as MinkowskiEngine)
        parity = torch.bitwise_and(_lattice(fc, stride)[:, 1:], 1)
        child_offset = (parity * _const((1, 2, 4), fc.device)).sum(dim=1)
        packer = _Packer(lat)  # the coarse set's extents are those of lat: the same packer serves it
        ukeys, parent = torch.unique(packer.keys(lat), sorted=True, return_inverse=True)
        rep = torch.empty(len(ukeys), dtype=torch.int64, device=fc.device)
        rep[parent] = torch.arange(len(parent), device=fc.device)  # any fine site of each coarse one
        coarse = Level(lat[rep] * _const((1, t2, t2, t2), fc.device), t2, order_fixed=False,
                       device=self.device, overhead=self.overhead(t2), keep_table=self.keep_tables,
                       offset_major_sites=self.offset_major_sites, sorted_keys=(packer, ukeys))
        if coarse.perm is not None:
            parent = _inverse(coarse.perm)[parent]
        self.levels[t2] = coarse
        dm = DownMap(fine, coarse, parent, child_offset, device=self.device, overhead=self.overhead(stride),
                     offsets=fine.n <= self.offset_major_sites)
        self.down_maps[stride] = dm
        return dm

    def stats(self) -> Dict[int, Dict[str, float]]:
        return {s: lv.stats() for s, lv in sorted(self.levels.items())}
