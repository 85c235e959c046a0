"""Exact packing: the skyline search (``skyline``) run as a portfolio, per independent part,
under a bisection on the capacity.

The steps, each for a reason:
- Units. Sizes share a factor (1 KiB in the MiniMalloc suite) that every canonical offset is a
  multiple of too (see _unit); dividing it out shrinks every height, and time is compressed to
  the sections between distinct start/end points.
- Parts. Where no buffer crosses a time point the instance splits into parts that never interact;
  each is solved on its own and the arena is the highest of theirs.
- Portfolio. Depth-first search on these instances is heavy-tailed: a strategy either finishes in
  a few hundred nodes or wanders for minutes. So short runs with a growing node limit (the Luby
  sequence) rotate over strategies (three buffer preorders as in MiniMalloc, by lifetime, size and
  area; left, right or both branchings; raising a valley before or after leaving dead space),
  then over randomly perturbed preorders, with a fixed seed so that results repeat. With one
  alignment, failed states are shared between the runs of one capacity.
- Bisection. With a capacity, fitting under it comes first; then the arena is bisected between the
  best packing found and the lower bound. A probe that exhausts its search proves its capacity
  infeasible and raises the proven bound; one that runs out of time only steers the bisection,
  which starts another pass from the bound while time is left.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

from tierplan.packing.skyline import FailureMemo, Problem, search

# (preorder, sides, raise first) tried in turn, then again with jittered preorders. Each of the
# hard instances is solved quickly by only a few of them, and not the same few; the broadly
# successful ones come first.
_LEADING = [
    ("size", "lr", False), ("size", "rl", True), ("lifetime", "r", True), ("area", "r", False),
    ("size", "r", False), ("area", "lr", False), ("lifetime", "lr", False), ("size", "l", True),
]
_STRATEGIES = _LEADING + [
    (order, sides, first)
    for order in ("size", "lifetime", "area")
    for sides in ("l", "r", "lr", "rl")
    for first in (True, False)
    if (order, sides, first) not in _LEADING
]
_BASE_NODES = 500  # node limit of the shortest run (20-50 ms on the MiniMalloc instances) ...
_NODES_PER_BUFFER = 3  # ... or more on large parts: a packing takes a node per buffer at least
_NOISE = 0.3  # relative jitter of the preorder keys in randomized runs
_FOUND, _PROVEN, _TIMEOUT, _GAVE_UP = "found", "proven", "timeout", "gave up"  # probe outcomes


@dataclass(frozen=True)
class Item:
    """A buffer as the exact search sees it: live over [start, end), ``size`` bytes at an offset
    that is a multiple of ``align``."""

    start: int
    end: int
    size: int
    align: int


@dataclass
class ExactResult:
    offsets: list[int]  # bytes, one per item, in input order
    arena: int  # bytes: the highest end of a buffer
    proven_bound: int  # bytes: no packing has a smaller arena (at least the bound passed in)
    fits: bool  # the arena is within the capacity asked for (always true without one)
    proof_capacity: int | None  # a capacity proven infeasible by exhausting the search, if any


@dataclass
class _Part:
    problem: Problem
    items: list[int]  # indices into the caller's item list
    offsets: list[int]  # units, the best packing of this part found so far
    arena: int  # units


def minimize_arena(
    items: Sequence[Item],
    incumbent: Sequence[int],
    bound: int,
    capacity: int | None,
    time_limit_s: float,
    seed: int = 0,
) -> ExactResult:
    """Pack ``items`` within ``capacity`` (bytes, None for no limit), then as low as time allows.

    ``incumbent`` is a valid packing (offsets in bytes, e.g. the greedy one) to start from, and
    ``bound`` a proven lower bound on the arena in bytes.
    """
    deadline = time.monotonic() + time_limit_s
    unit = _unit(items)
    if unit == 0:  # nothing occupies memory
        return ExactResult([0] * len(items), 0, 0, True, None)
    for i, it in enumerate(items):
        if it.size > 0 and incumbent[i] % unit:
            raise ValueError(f"incumbent offset {incumbent[i]} of item {i} is not a multiple of {unit}")
    parts = _split(items, incumbent, unit)
    rng = random.Random(seed)
    lo = -(-bound // unit)  # every arena is a multiple of the unit
    proof: int | None = None

    def probe(cap: int, probe_deadline: float) -> str:
        """FOUND if every part now fits under ``cap``, PROVEN if one provably cannot, else why
        not (TIMEOUT or GAVE_UP)."""
        for part in sorted(parts, key=lambda p: -p.arena):
            if part.arena <= cap:
                continue
            found, status = _solve(part.problem, cap, probe_deadline, rng)
            if found is None:
                return status
            part.offsets, part.arena = found, _arena(part.problem, found)
        return _FOUND

    hi = max(p.arena for p in parts)
    if capacity is not None and hi * unit > capacity:
        cap = capacity // unit
        if probe(cap, deadline) == _PROVEN:
            lo, proof = max(lo, cap + 1), cap * unit
        hi = max(p.arena for p in parts)
    fits = capacity is None or hi * unit <= capacity
    guide, timed_out = lo, False  # lowest capacity worth probing: above lo after timeouts
    while fits and lo < hi and time.monotonic() < deadline:
        if guide >= hi:  # a pass of the bisection is over, time is left: another pass, since
            if not timed_out:  # randomized runs may succeed where the last ones timed out
                break
            guide, timed_out = lo, False
        mid = (guide + hi) // 2
        remaining = deadline - time.monotonic()
        outcome = probe(mid, time.monotonic() + max(remaining / 3, min(remaining, 0.5)))
        if outcome == _FOUND:
            hi = max(p.arena for p in parts)
        elif outcome == _PROVEN:
            lo = guide = mid + 1
            proof = mid * unit
        else:
            guide = mid + 1
            timed_out |= outcome == _TIMEOUT
    offsets = [0] * len(items)
    for part in parts:
        for local, i in enumerate(part.items):
            offsets[i] = part.offsets[local] * unit
    arena = max((offsets[i] + it.size for i, it in enumerate(items) if it.size > 0), default=0)
    return ExactResult(offsets, arena, max(bound, lo * unit), fits, proof)


def _unit(items: Sequence[Item]) -> int:
    """The largest unit every canonical offset and size is a multiple of (0 if all are empty).

    Sizes share their gcd; an alignment keeps offsets on that lattice when it divides the unit
    (then it constrains nothing) or is a multiple of it (then it is a coarser lattice). Any other
    alignment shrinks the unit to their gcd, until all of them are of one kind or the other.
    """
    unit = 0
    for it in items:
        if it.size > 0:
            unit = math.gcd(unit, it.size)
    aligns = {it.align for it in items if it.size > 0}
    changed = unit > 0
    while changed:
        changed = False
        for a in aligns:
            if unit % a and a % unit:
                unit, changed = math.gcd(unit, a), True
    return unit


def _split(items: Sequence[Item], incumbent: Sequence[int], unit: int) -> list[_Part]:
    """Independent parts in search units, each seeded with the incumbent's offsets."""
    live = [i for i, it in enumerate(items) if it.size > 0]
    points = sorted({items[i].start for i in live} | {items[i].end for i in live})
    index = {p: k for k, p in enumerate(points)}
    crossing = [0] * (len(points) + 1)
    for i in live:
        crossing[index[items[i].start] + 1] += 1
        crossing[index[items[i].end]] -= 1
    # A cut at point k when no buffer has start < k < end.
    cuts, running = [0], 0
    for k in range(1, len(points) - 1):
        running += crossing[k]
        if running == 0:
            cuts.append(k)
    cuts.append(len(points) - 1)
    groups: dict[int, list[int]] = {}
    for i in live:
        k = index[items[i].start]
        groups.setdefault(_part_of(cuts, k), []).append(i)
    parts = []
    for g in sorted(groups):
        members, base = groups[g], cuts[g]
        problem = Problem(
            starts=tuple(index[items[i].start] - base for i in members),
            ends=tuple(index[items[i].end] - base for i in members),
            sizes=tuple(items[i].size // unit for i in members),
            aligns=tuple(max(1, items[i].align // unit) for i in members),
            sections=cuts[g + 1] - base,
        )
        offsets = [incumbent[i] // unit for i in members]
        parts.append(_Part(problem, members, offsets, _arena(problem, offsets)))
    return parts


def _part_of(cuts: list[int], k: int) -> int:
    lo, hi = 0, len(cuts) - 2
    while lo < hi:  # the last g with cuts[g] <= k
        mid = (lo + hi + 1) // 2
        if cuts[mid] <= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _arena(problem: Problem, offsets: Sequence[int]) -> int:
    return max((o + z for o, z in zip(offsets, problem.sizes)), default=0)


def _solve(
    problem: Problem, cap: int, deadline: float, rng: random.Random
) -> tuple[list[int] | None, str]:
    """Run the portfolio on one part: (offsets, FOUND), or None and why: PROVEN (no packing
    under ``cap``), TIMEOUT, or GAVE_UP (every strategy ran out of options but, with mixed
    alignments, that proves nothing)."""
    complete = len(set(problem.aligns)) <= 1
    # Failed states are facts about the capacity only when the search is complete; otherwise
    # another strategy may still reach what one strategy's skyline hid, so each run keeps its own.
    shared = FailureMemo()
    run = exhausted = 0
    while exhausted < len(_STRATEGIES):
        if time.monotonic() >= deadline:
            return None, _TIMEOUT
        order, sides, raise_first = _STRATEGIES[run % len(_STRATEGIES)]
        noise = 0.0 if run < len(_STRATEGIES) else _NOISE
        rank = _preorder(problem, order, rng if noise else None, noise)
        base = max(_BASE_NODES, _NODES_PER_BUFFER * len(problem.sizes))
        limit = base * _luby(run // len(_STRATEGIES) + 1)
        memo = shared if complete else FailureMemo()
        outcome = search(problem, cap, rank, sides, raise_first, limit, deadline, memo)
        if outcome.offsets is not None:
            return outcome.offsets, _FOUND
        if outcome.proven_infeasible:
            if complete:
                return None, _PROVEN
            exhausted += 1
        else:
            exhausted = 0
        run += 1
    return None, _GAVE_UP


def _preorder(problem: Problem, order: str, rng: random.Random | None, noise: float) -> list[int]:
    """Rank of each buffer (0 = tried first) under one of the preorders, optionally jittered."""
    n = len(problem.sizes)
    jitter = [1.0 + noise * rng.random() if rng else 1.0 for _ in range(n)]
    length = [e - s for s, e in zip(problem.starts, problem.ends)]
    size = problem.sizes
    if order == "size":
        key = lambda i: (-size[i] * jitter[i], -length[i], i)  # noqa: E731
    elif order == "lifetime":
        key = lambda i: (-length[i] * jitter[i], -size[i], i)  # noqa: E731
    else:
        key = lambda i: (-size[i] * length[i] * jitter[i], -size[i], i)  # noqa: E731
    rank = [0] * n
    for r, i in enumerate(sorted(range(n), key=key)):
        rank[i] = r
    return rank


def _luby(i: int) -> int:
    """The i-th term (from 1) of the Luby sequence 1, 1, 2, 1, 1, 2, 4, ..."""
    while True:
        k = 1
        while (1 << k) - 1 < i:
            k += 1
        if (1 << k) - 1 == i:
            return 1 << (k - 1)
        i -= (1 << (k - 1)) - 1
