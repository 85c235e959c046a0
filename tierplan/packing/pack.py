"""Static buffer packing: one offset per buffer in a single arena, as small as possible.

Each buffer lives over a half-open step range [start, end) and needs ``size`` bytes at an offset
that is a multiple of its ``alignment``; buffers live at the same time must not overlap. This is
dynamic storage allocation, NP-hard, and what TFLite, XLA's heap simulator, TelaMalloc and
MiniMalloc solve for accelerators. The lifetimes of a captured model's storages
(``tierplan.passes.liveness.Lifetime``) are accepted as buffers directly.

- ``lower_bound``: the most bytes live at one time (tightened for alignment); no arena is smaller.
- ``pack_greedy``: best fit by size, largest first into the smallest gap that holds it (TFLite's
  and XLA's greedy). Fast; well above the bound on hard instances, often at it on simple
  inference traces (bench/buffers.py prints both).
- ``pack_exact``: the greedy packing improved by the skyline search (``exact``). Exact means
  complete: with one alignment for all buffers, a search that runs out of options proves the
  capacity infeasible; with mixed alignments it is a (strong) heuristic.
- ``pack``: greedy first, the exact search only when greedy is above the bound.

The data types are in ``buffers`` (re-exported here); MiniMalloc's CSV format is read and
written by ``tierplan.formats.buffers_csv``.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

from tierplan.packing.exact import Item, minimize_arena
from tierplan.packing.buffers import (
    Buffer,
    BufferLike,
    Packing,
    PackingError,
    as_buffers,
    check_buffers,
)

__all__ = [
    "Buffer", "BufferLike", "Packing", "PackingError", "as_buffers", "check_buffers",
    "lower_bound", "pack", "pack_exact", "pack_greedy", "verify",
]

GREEDY = "greedy-by-size"
SEARCH = "skyline-search"
_MARGIN_S = 0.05  # of the time limit, left for building the result


def _check_capacity(capacity: int | None) -> None:
    if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
        raise PackingError(f"capacity must be a non-negative integer, got {capacity!r}")


def lower_bound(buffers: Iterable[BufferLike]) -> int:
    """The most bytes live at one time, a lower bound on every arena.

    With alignment it is tightened: the offsets of the buffers live at one time are all multiples
    of g, the gcd of their alignments, so each but the topmost one takes its size rounded up to g.
    """
    bufs = [b for b in as_buffers(buffers) if b.size > 0]
    if all(b.alignment == 1 for b in bufs):
        events = sorted([(b.start, b.size) for b in bufs] + [(b.end, -b.size) for b in bufs])
        best = running = 0
        for _, delta in events:  # ends sort before starts at the same step: half-open ranges
            running += delta
            best = max(best, running)
        return best
    best = 0
    for t in sorted({b.start for b in bufs}):  # the live set only grows at a start
        live = [b for b in bufs if b.start <= t < b.end]
        g = 0
        for b in live:
            g = math.gcd(g, b.alignment)
        padded = [-(-b.size // g) * g for b in live]
        waste = max(p - b.size for p, b in zip(padded, live))
        best = max(best, sum(padded) - waste)
    return best


def _greedy_offsets(bufs: Sequence[Buffer]) -> list[int]:
    """TFLite/XLA greedy by size: largest first (then longest), each into the smallest gap
    between the buffers already placed that overlap it in time, or on top of them."""
    order = sorted(range(len(bufs)), key=lambda i: (-bufs[i].size, bufs[i].start - bufs[i].end, i))
    offsets = [0] * len(bufs)
    placed: list[int] = []
    for i in order:
        b = bufs[i]
        if b.size == 0:
            continue
        busy = sorted(
            (offsets[j], offsets[j] + bufs[j].size)
            for j in placed
            if bufs[j].start < b.end and b.start < bufs[j].end
        )
        best, best_gap, floor = None, None, 0
        for lo, hi in busy:
            at = -(-floor // b.alignment) * b.alignment
            if at + b.size <= lo and (best_gap is None or lo - floor < best_gap):
                best, best_gap = at, lo - floor
            floor = max(floor, hi)
        offsets[i] = best if best is not None else -(-floor // b.alignment) * b.alignment
        placed.append(i)
    return offsets


def _arena(bufs: Sequence[Buffer], offsets: Sequence[int]) -> int:
    return max((o + b.size for o, b in zip(offsets, bufs) if b.size > 0), default=0)


def _packing(bufs, offsets, bound, method, started) -> Packing:
    arena = _arena(bufs, offsets)
    return Packing(
        offsets={b.id: o for b, o in zip(bufs, offsets)},
        arena_bytes=arena,
        lower_bound=bound,
        optimal=arena == bound,
        solve_s=time.perf_counter() - started,
        method=method,
    )


def _infeasible(bound: int, capacity: int) -> PackingError:
    return PackingError(
        f"the buffers cannot fit in {capacity:,} bytes: {bound:,} bytes are live at once "
        f"(lower bound {bound:,} > capacity {capacity:,})"
    )


def _prepare(buffers: Iterable[BufferLike], capacity: int | None) -> tuple[list[Buffer], int]:
    """Checked buffers and their lower bound; PackingError when the bound exceeds ``capacity``."""
    _check_capacity(capacity)
    bufs = as_buffers(buffers)
    bound = lower_bound(bufs)
    if capacity is not None and bound > capacity:
        raise _infeasible(bound, capacity)
    return bufs, bound


def pack_greedy(buffers: Iterable[BufferLike], capacity: int | None = None) -> Packing:
    """Greedy best fit by size. Raises PackingError when its arena exceeds ``capacity``."""
    started = time.perf_counter()
    bufs, bound = _prepare(buffers, capacity)
    result = _packing(bufs, _greedy_offsets(bufs), bound, GREEDY, started)
    if capacity is not None and result.arena_bytes > capacity:
        raise PackingError(
            f"greedy packing needs {result.arena_bytes:,} bytes, over the capacity {capacity:,} "
            f"(lower bound {bound:,}); pack_exact may fit"
        )
    return result


def pack_exact(
    buffers: Iterable[BufferLike], capacity: int | None = None, time_limit_s: float = 10.0
) -> Packing:
    """The smallest arena the skyline search finds within ``time_limit_s``, within ``capacity``.

    Starts from the greedy packing; ``optimal`` is set when the arena meets a proven lower bound.
    Raises PackingError when no packing within the capacity exists or none was found in time.
    """
    started = time.perf_counter()
    bufs, bound = _prepare(buffers, capacity)
    greedy = _greedy_offsets(bufs)
    if _arena(bufs, greedy) == bound:
        return _packing(bufs, greedy, bound, GREEDY, started)
    budget = max(0.0, time_limit_s - (time.perf_counter() - started) - _MARGIN_S)
    return _search(bufs, greedy, bound, capacity, budget, started)


def pack(
    buffers: Iterable[BufferLike], capacity: int | None = None, time_limit_s: float = 10.0
) -> Packing:
    """Greedy first; the exact search, with the time left, only when greedy is above the bound."""
    return pack_exact(buffers, capacity, time_limit_s)  # pack_exact starts with the greedy


def _search(bufs, greedy, bound, capacity, budget, started) -> Packing:
    items = [Item(b.start, b.end, b.size, b.alignment) for b in bufs]
    result = minimize_arena(items, greedy, bound, capacity, budget)
    if not result.fits:
        if result.proof_capacity is not None:
            raise PackingError(
                f"the buffers cannot fit in {capacity:,} bytes: the exact search proved it "
                f"(lower bound {bound:,}, capacity {capacity:,})"
            )
        raise PackingError(
            f"no packing within {capacity:,} bytes found in {budget:.1f} s (lower bound "
            f"{bound:,}, capacity {capacity:,}, best found {result.arena:,}); "
            f"a longer time limit may find one"
        )
    method = GREEDY if result.offsets == list(greedy) else SEARCH
    return _packing(bufs, result.offsets, result.proven_bound, method, started)


def verify(buffers: Iterable[BufferLike], packing: Packing, capacity: int | None = None) -> None:
    """Raise PackingError unless ``packing`` places every buffer aligned, without overlapping a
    buffer live at the same time, with the arena it claims, within ``capacity``."""
    bufs = as_buffers(buffers)
    missing = [b.id for b in bufs if b.id not in packing.offsets]
    if missing:
        raise PackingError(f"packing has no offset for buffer {missing[0]!r}")
    offsets = [packing.offsets[b.id] for b in bufs]
    for b, o in zip(bufs, offsets):
        if not isinstance(o, int) or o < 0 or o % b.alignment:
            raise PackingError(f"buffer {b.id!r}: offset {o!r} is not a multiple of {b.alignment} >= 0")
    active: list[int] = []
    for i in sorted(range(len(bufs)), key=lambda i: bufs[i].start):
        b = bufs[i]
        if b.size == 0:
            continue
        active = [j for j in active if bufs[j].end > b.start]
        for j in active:
            if offsets[i] < offsets[j] + bufs[j].size and offsets[j] < offsets[i] + b.size:
                raise PackingError(
                    f"buffers {bufs[j].id!r} and {b.id!r} are live together at step {b.start} "
                    f"and overlap: [{offsets[j]}, {offsets[j] + bufs[j].size}) and "
                    f"[{offsets[i]}, {offsets[i] + b.size})"
                )
        active.append(i)
    arena = _arena(bufs, offsets)
    if arena != packing.arena_bytes:
        raise PackingError(f"packing claims an arena of {packing.arena_bytes:,} bytes; it is {arena:,}")
    if capacity is not None and arena > capacity:
        raise PackingError(f"arena {arena:,} bytes exceeds the capacity {capacity:,}")
