"""Kernel maps of the torch backend, built with torch ops only.

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
            gathered matrix, in chunks of rows small enough to stay in cache; an offset that is
            in the bucket's mask but absent for a row reads zeros. Merging rare masks into
            supersets trades a few multiplications by zero for fewer, fatter GEMMs (the cost
            model is in :func:`choose_buckets`).

A :class:`CoordinateManager` holds the coordinate sets of one forward pass (one per tensor
stride) and every map between them; each is built once and reused by all layers that need it.
When the manager creates a coarser set it is free to choose the row order, and it orders rows
by bucket of that level's 3x3x3 plan (then by coordinates), so the stride-1 convolutions write
their output as contiguous slices.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

# Offset tables in MinkowskiEngine 0.5.4's kernel order (x fastest), as (K, 3) int64.
KERNEL3 = torch.tensor([[i % 3 - 1, (i // 3) % 3 - 1, i // 9 - 1] for i in range(27)], dtype=torch.int64)
KERNEL2 = torch.tensor([[i % 2, (i // 2) % 2, i // 4] for i in range(8)], dtype=torch.int64)

# Rows of a chunk times offsets of its bucket: the gathered chunk has CHUNK_ENTRIES * C floats,
# 2 MiB at 32 channels and 8 MiB at 128 (measured: GEMMs of 2-5k rows run 1.2-2.5x faster
# than the same GEMM on 100k rows here, whose operands do not stay in cache).
CHUNK_ENTRIES = 16384

# Per-bucket overhead of the cost model, in row-offsets (one row through one offset).
BUCKET_OVERHEAD = 1500
MAX_CANDIDATES = 48


def _popcount(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    c = torch.zeros_like(x)
    while bool((x != 0).any()):
        c += x & 1
        x >>= 1
    return c


@dataclass
class Bucket:
    """Rows that run as one (chunked) GEMM: ``out[rows] = gather(x, idx) @ W[cols]``."""

    cols: torch.Tensor  # (k,) int64 kernel offsets of the bucket's mask
    start: int  # when rows is None, the rows are start .. start + n
    n: int
    rows: Optional[torch.Tensor]  # (n,) int64 output rows, or None when contiguous
    idx: torch.Tensor  # (n * k,) int64 input rows, row-major; absent entries point at row 0
    # Chunks: (r0, r1, missing) with missing the flat positions (into the chunk's n*k entries)
    # of absent entries that must read zero, or None.
    chunks: List[Tuple[int, int, Optional[torch.Tensor]]] = field(default_factory=list)

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

    @property
    def n_entries(self) -> int:
        """Row-offsets actually multiplied, zeros included (for FLOP counts)."""
        return sum(b.n * b.k for b in self.buckets)

    def to(self, device: torch.device) -> "Plan":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        buckets = [Bucket(mv(b.cols), b.start, b.n, mv(b.rows), mv(b.idx),
                          [(r0, r1, mv(m)) for r0, r1, m in b.chunks]) for b in self.buckets]
        return Plan(self.n_out, self.n_in, self.K, buckets, self.covers_all)


def choose_buckets(masks: torch.Tensor, overhead: int = BUCKET_OVERHEAD,
                   max_candidates: int = MAX_CANDIDATES) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group rows by offset mask; returns ``(bucket_of_row (n,), bucket_masks (B,))``.

    Cost of a bucket = rows x popcount(bucket mask) + ``overhead``. Candidates are the most
    frequent masks plus a catch-all (the union of all masks); each distinct mask goes to its
    cheapest superset candidate, then candidates are dropped greedily while dropping one costs
    less than its overhead. Rows of masks nobody else covers end up in the catch-all, whose
    mask is finally shrunk to the union of its members.
    """
    uniq, inv, cnt = torch.unique(masks, return_inverse=True, return_counts=True)
    order = torch.argsort(cnt, descending=True, stable=True)
    union = _or_all(uniq)
    cand = uniq[order[:max_candidates]]
    cand = torch.cat([cand, torch.tensor([union], dtype=uniq.dtype)])
    cpop = _popcount(cand).to(torch.float64)
    covers = (uniq[:, None] & ~cand[None, :]) == 0  # (U, B): candidate b is a superset of mask u
    cost = torch.where(covers, cpop[None, :], torch.full_like(cpop[None, :], math.inf))
    cntf = cnt.to(torch.float64)
    alive = torch.ones(len(cand), dtype=torch.bool)
    while True:
        c = torch.where(alive[None, :], cost, torch.full_like(cost, math.inf))
        best, assign = c.min(dim=1)
        # Cost increase of dropping each live candidate (the catch-all, last, is never dropped).
        second = c.clone()
        second[torch.arange(len(uniq)), assign] = math.inf
        second_best = second.min(dim=1).values
        delta = torch.zeros(len(cand), dtype=torch.float64)
        delta.index_add_(0, assign, cntf * (second_best - best))
        used = torch.zeros(len(cand), dtype=torch.bool)
        used[assign] = True
        delta[~used] = -1.0  # unused candidates go first, for free
        delta[~alive] = math.inf
        delta[-1] = math.inf
        j = int(torch.argmin(delta))
        if not bool(torch.isfinite(delta[j])) or float(delta[j]) >= overhead:
            break
        alive[j] = False
    best, assign = torch.where(alive[None, :], cost, torch.full_like(cost, math.inf)).min(dim=1)
    used_ids, bucket_of_uniq = torch.unique(assign, return_inverse=True)
    bucket_masks = cand[used_ids].clone()
    # Shrink every bucket's mask to the union of its members' masks.
    for b in range(len(used_ids)):
        bucket_masks[b] = _or_all(uniq[bucket_of_uniq == b])
    return bucket_of_uniq[inv], bucket_masks


def _or_all(x: torch.Tensor) -> int:
    out = 0
    for v in torch.unique(x).tolist():
        out |= int(v)
    return out


def build_plan(table: torch.Tensor, n_in: int, bucket_of_row: torch.Tensor, bucket_masks: torch.Tensor,
               contiguous: bool) -> Plan:
    """Cut ``table`` (n_out, K) into the given buckets.

    With ``contiguous`` the rows must already be sorted by bucket, and each bucket is a slice.
    """
    n_out, K = table.shape
    bits = torch.arange(K, dtype=torch.int64)
    buckets: List[Bucket] = []
    if contiguous:
        counts = torch.bincount(bucket_of_row, minlength=len(bucket_masks)).tolist()
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
    else:
        order = torch.argsort(bucket_of_row, stable=True)
        counts = torch.bincount(bucket_of_row, minlength=len(bucket_masks)).tolist()
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
    for b, m in enumerate(bucket_masks.tolist()):
        n = counts[b]
        if n == 0:
            continue
        cols = bits[((m >> bits) & 1).bool()]
        if contiguous:
            rows = None
            sub = table[starts[b]:starts[b] + n]
        else:
            rows = order[starts[b]:starts[b] + n]
            sub = table.index_select(0, rows)
        sub = sub[:, cols]
        absent = sub < 0
        idx = sub.clamp(min=0).reshape(-1).contiguous()
        k = int(cols.numel())
        step = max(64, CHUNK_ENTRIES // max(k, 1))
        chunks = []
        flat_absent = absent.reshape(-1)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            miss = torch.nonzero(flat_absent[r0 * k:r1 * k]).reshape(-1)
            chunks.append((r0, r1, miss if miss.numel() else None))
        buckets.append(Bucket(cols, starts[b] if contiguous else 0, n, rows, idx, chunks))
    return Plan(n_out, n_in, K, buckets, covers_all=sum(counts) == n_out)


class _Packer:
    """Packs lattice coordinates ``(b, u, v, w)`` into sortable int64 keys with a margin of one
    lattice step on every side, so that a neighbour's key is the site's key plus a constant."""

    def __init__(self, lattice: torch.Tensor):
        lo = lattice.min(dim=0).values
        hi = lattice.max(dim=0).values
        self.lo = lo.clone()
        self.lo[1:] -= 1
        ext = (hi - self.lo + 1)
        ext[1:] += 1
        self.ext = [int(e) for e in ext.tolist()]
        if math.prod(float(e) for e in self.ext) >= 2.0**62:
            raise ValueError(f"coordinate extent {self.ext} too large to pack into int64 keys")

    def keys(self, lattice: torch.Tensor) -> torch.Tensor:
        s = lattice - self.lo.to(lattice.device)
        e = self.ext
        return ((s[:, 0] * e[1] + s[:, 1]) * e[2] + s[:, 2]) * e[3] + s[:, 3]

    def delta(self, d: torch.Tensor) -> int:
        e = self.ext
        return int((int(d[0]) * e[2] + int(d[1])) * e[3] + int(d[2]))


class Level:
    """One coordinate set at tensor stride ``stride``, with its 3x3x3 neighbour plan."""

    def __init__(self, coords: torch.Tensor, stride: int, order_fixed: bool, overhead: int = BUCKET_OVERHEAD):
        # coords (N, 4) int64 on the CPU or the compute device; the lattice is coords / stride.
        self.stride = stride
        dev = coords.device
        lattice = coords.clone()
        lattice[:, 1:] = torch.div(lattice[:, 1:], stride, rounding_mode="floor")
        packer = _Packer(lattice)
        keys = packer.keys(lattice)
        skeys, sorder = torch.sort(keys)
        n = coords.shape[0]
        if n > 1 and bool((skeys[1:] == skeys[:-1]).any()):
            dup = int(sorder[1:][skeys[1:] == skeys[:-1]][0])
            raise ValueError(f"duplicate coordinate {coords[dup].tolist()} (row {dup}); sites must be unique "
                             "(voxelize the points first)")
        table = torch.full((n, 27), -1, dtype=torch.int64, device=dev)
        table[:, 13] = torch.arange(n, device=dev)
        for i in range(13):
            q = skeys + packer.delta(KERNEL3[i])
            pos = torch.searchsorted(skeys, q).clamp_(max=n - 1)
            hit = skeys[pos] == q
            src = sorder[hit]
            dst = sorder[pos[hit]]
            table[src, i] = dst  # src + d_i = dst
            table[dst, 26 - i] = src  # dst - d_i = src
        bitw = (torch.ones(27, dtype=torch.int64, device=dev) << torch.arange(27, device=dev))
        masks = ((table >= 0).to(torch.int64) * bitw).sum(dim=1)
        bucket_of_row, bucket_masks = choose_buckets(masks.cpu(), overhead=overhead)
        bucket_of_row = bucket_of_row.to(dev)
        self.perm: Optional[torch.Tensor] = None  # new row r was old row perm[r]
        if not order_fixed:
            # Bucket first, then coordinate order inside a bucket (neighbours stay close in memory).
            perm = sorder[torch.argsort(bucket_of_row[sorder], stable=True)]
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(n, device=dev)
            table = table[perm]
            table = torch.where(table >= 0, inv[table.clamp(min=0)], table)
            coords = coords[perm]
            keys = keys[perm]
            bucket_of_row = bucket_of_row[perm]
            self.perm = perm
            skeys, sorder = torch.sort(keys)
        self.coords = coords
        self.packer = packer
        self.sorted_keys, self.sort_order = skeys, sorder
        self.n = n
        self.plan = build_plan(table, n, bucket_of_row, bucket_masks, contiguous=not order_fixed)
        self.table = table

    def stats(self) -> Dict[str, float]:
        active = int((self.table >= 0).sum())
        return {"sites": self.n, "neighbours": active / max(self.n, 1), "buckets": len(self.plan.buckets),
                "padding": self.plan.n_entries / max(active, 1) - 1.0}


class DownMap:
    """Kernel-2 stride-2 map from a fine level (stride t) to the coarse level (stride 2t)."""

    def __init__(self, fine: Level, coarse: Level, parent: torch.Tensor, child_offset: torch.Tensor,
                 overhead: int = BUCKET_OVERHEAD):
        nf, nc = fine.n, coarse.n
        dev = parent.device
        table = torch.full((nc, 8), -1, dtype=torch.int64, device=dev)
        table[parent, child_offset] = torch.arange(nf, device=dev)
        bitw = torch.ones(8, dtype=torch.int64, device=dev) << torch.arange(8, device=dev)
        masks = ((table >= 0).to(torch.int64) * bitw).sum(dim=1)
        bucket_of_row, bucket_masks = choose_buckets(masks.cpu(), overhead=overhead)
        # coarse rows: out[c] = sum_i fine[table[c, i]] @ W[i]
        self.down = build_plan(table, nf, bucket_of_row.to(dev), bucket_masks, contiguous=False)
        # fine rows: exactly one entry each, out[p] = coarse[parent[p]] @ W[offset[p]]
        up_table = torch.full((nf, 8), -1, dtype=torch.int64, device=dev)
        up_table[torch.arange(nf, device=dev), child_offset] = parent
        self.up = build_plan(up_table, nc, child_offset, torch.ones(8, dtype=torch.int64) << torch.arange(8),
                             contiguous=False)
        self.parent = parent
        self.child_offset = child_offset


class CoordinateManager:
    """The coordinate sets and kernel maps of one forward pass.

    ``coords`` (N, 4) integer tensor (batch index, x, y, z) of unique sites at stride 1. With
    ``reorder=True`` the manager may permute the input rows (``perm``: new row r is input row
    perm[r]); callers then permute features with :meth:`to_internal` and restore the input
    order with :meth:`to_input_order`.
    """

    def __init__(self, coords: torch.Tensor, reorder: bool = True, overhead: int = BUCKET_OVERHEAD):
        self.overhead = overhead
        c = coords.to(torch.int64)
        base = Level(c, 1, order_fixed=not reorder, overhead=overhead)
        self.perm = base.perm
        self.inv_perm = None
        if self.perm is not None:
            self.inv_perm = torch.empty_like(self.perm)
            self.inv_perm[self.perm] = torch.arange(len(self.perm), device=self.perm.device)
        self.levels: Dict[int, Level] = {1: base}
        self.down_maps: Dict[int, DownMap] = {}

    @property
    def device(self) -> torch.device:
        return self.levels[1].coords.device

    def to_internal(self, feats: torch.Tensor) -> torch.Tensor:
        return feats if self.perm is None else feats.index_select(0, self.perm)

    def to_input_order(self, feats: torch.Tensor) -> torch.Tensor:
        return feats if self.inv_perm is None else feats.index_select(0, self.inv_perm)

    def level(self, stride: int) -> Level:
        if stride not in self.levels:
            if stride % 2 or stride < 2:
                raise ValueError(f"no coordinate set at tensor stride {stride}")
            self.down_map(stride // 2)
        return self.levels[stride]

    def down_map(self, stride: int) -> DownMap:
        """The map from stride ``stride`` to ``2 * stride`` (creating the coarse set if needed)."""
        if stride in self.down_maps:
            return self.down_maps[stride]
        fine = self.level(stride)
        dev = fine.coords.device
        t2 = 2 * stride
        fc = fine.coords
        pc = fc.clone()
        pc[:, 1:] = torch.div(fc[:, 1:], t2, rounding_mode="floor") * t2
        off = torch.div(fc[:, 1:] - pc[:, 1:], stride, rounding_mode="floor")  # in {0, 1}^3
        child_offset = off[:, 0] + 2 * off[:, 1] + 4 * off[:, 2]
        lat = pc.clone()
        lat[:, 1:] = torch.div(lat[:, 1:], t2, rounding_mode="floor")
        ukeys, parent = torch.unique(_Packer(lat).keys(lat), return_inverse=True)
        rep = torch.empty(len(ukeys), dtype=torch.int64, device=dev)
        rep.scatter_(0, parent, torch.arange(len(parent), device=dev))
        coarse = Level(pc[rep], t2, order_fixed=False, overhead=self.overhead)
        if coarse.perm is not None:
            inv = torch.empty_like(coarse.perm)
            inv[coarse.perm] = torch.arange(len(inv), device=dev)
            parent = inv[parent]
        self.levels[t2] = coarse
        dm = DownMap(fine, coarse, parent, child_offset, overhead=self.overhead)
        self.down_maps[stride] = dm
        return dm

    def stats(self) -> Dict[int, Dict[str, float]]:
        return {s: lv.stats() for s, lv in sorted(self.levels.items())}
