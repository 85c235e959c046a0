"""The exact packing search: depth-first over canonical skyline placements.

Works on a ``Problem`` in search units (time compressed to sections, sizes and alignments divided
by their common factor) and answers one question: does every buffer fit under ``cap``?

Canonical solutions. Any packing can be pushed down until every buffer rests on another buffer or
on offset 0 (MiniMalloc's observation, Moffitt ASPLOS 2023: searching such canonical solutions
only is complete). Such a packing is built bottom-up as a skyline: per section, the height below
which nothing more can go. The search takes a *valley* of the skyline (a maximal run of sections
at height L whose neighbours are higher, or walls) and branches on which buffer is the leftmost
(or, mirrored, the rightmost) one to sit at height L inside that valley; the sections it skips
over are dead up to the lower of its top and the neighbour. One more branch says no buffer sits
at L in the valley: the valley is raised to its lower neighbour. Each canonical packing is reached
along exactly one path, so there is no symmetry between placement orders to prune.

Inference. A section's room is ``cap - sky - unplaced bytes live there``; placing a buffer keeps
it, dead space spends it, and a branch that would drive it negative is cut. Among the valleys the
search picks the one with the fewest surviving branches (first fail); buffers identical in
(start, end, size, alignment) are tried once. When no unplaced buffer crosses a time point the
region splits into independent parts (MiniMalloc's dynamic decomposition); a part that fails makes
the search jump straight back to the decision that created it, and failed (part, skyline) states
are remembered so that no restart re-proves them.

Completeness holds when every buffer has the same alignment (in search units): then a failed
search with no node limit hit proves the capacity infeasible. With mixed alignments the skyline
can hide a gap under an aligned buffer, so a failure there is not a proof.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

_WALL = 1 << 62  # height of the world beyond a region's edges: nothing crosses it


@dataclass(frozen=True)
class Problem:
    """Buffer i lives on sections [starts[i], ends[i]) and needs sizes[i] units at an offset that
    is a multiple of aligns[i]; ``sections`` is the number of sections."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    sizes: tuple[int, ...]
    aligns: tuple[int, ...]
    sections: int


@dataclass
class SearchOutcome:
    offsets: list[int] | None  # one per buffer, in units; None when no packing was found
    proven_infeasible: bool  # the search space was exhausted (a proof only with one alignment)
    nodes: int


class FailureMemo:
    """(region, unplaced buffers, skyline) states known to have no completion under one capacity.

    Bounded by the number of skyline cells stored, so that long runs stay within memory; it is
    emptied when full, which only costs re-proving."""

    def __init__(self, max_cells: int = 2_000_000) -> None:
        self._keys: set[tuple] = set()
        self._cells = 0
        self._max_cells = max_cells

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys

    def add(self, key: tuple) -> None:
        self._cells += len(key[3])
        if self._cells > self._max_cells:
            self._keys.clear()
            self._cells = len(key[3])
        self._keys.add(key)


def search(
    problem: Problem,
    cap: int,
    rank: list[int],
    sides: str,
    raise_first: bool,
    node_limit: int,
    deadline: float,
    memo: FailureMemo,
) -> SearchOutcome:
    """Look for offsets packing ``problem`` under ``cap`` units.

    ``rank`` orders the buffers tried at a valley (lower first); ``sides`` says which of the two
    mirrored branchings a valley may use: "l", "r", or both ("lr"/"rl", preferring the first on
    ties); ``raise_first`` tries raising a valley before the buffers that leave dead space in it
    (else after them). The search stops after ``node_limit`` nodes or at ``deadline``
    (time.monotonic()).
    """
    nb, n = len(problem.sizes), problem.sections
    start, end = list(problem.starts), list(problem.ends)
    size, align = list(problem.sizes), list(problem.aligns)
    sky = [0] * n  # nothing more can go below sky[t] in section t
    rem = [0] * n  # bytes of unplaced buffers live in section t
    cross = [0] * (n + 1)  # unplaced buffers with start < p < end: 0 means a cut at point p
    for i in range(nb):
        for t in range(start[i], end[i]):
            rem[t] += size[i]
        for p in range(start[i] + 1, end[i]):
            cross[p] += 1
    if any(r > cap for r in rem) or any(z > cap for z in size):
        return SearchOutcome(None, True, 0)
    by_rank = sorted(range(nb), key=rank.__getitem__)
    by_start: list[list[int]] = [[] for _ in range(n)]
    by_end: list[list[int]] = [[] for _ in range(n + 1)]
    for i in by_rank:
        by_start[start[i]].append(i)
        by_end[end[i]].append(i)
    # Buffers alike in every respect are interchangeable: only the first unplaced one is tried.
    first_alike: dict[tuple[int, int, int, int], int] = {}
    alike = [first_alike.setdefault((start[i], end[i], size[i], align[i]), i) for i in range(nb)]
    twins = [False] * nb
    for i in range(nb):
        if alike[i] != i:
            twins[i] = twins[alike[i]] = True
    placed = [False] * nb
    offset = [0] * nb
    unplaced_bits = [(1 << nb) - 1]
    region_bits: dict[tuple[int, int], int] = {}
    trail: list[tuple] = []  # undo log: (i, old height) for a placement, (-1, lo, old) for a raise

    def bits_within(lo: int, hi: int) -> int:
        key = (lo, hi)
        bits = region_bits.get(key)
        if bits is None:
            bits = 0
            for i in range(nb):
                if start[i] >= lo and end[i] <= hi:
                    bits |= 1 << i
            region_bits[key] = bits
        return bits

    def place(i: int, level: int, off: int) -> None:
        placed[i] = True
        offset[i] = off
        z, top = size[i], off + size[i]
        for t in range(start[i], end[i]):
            sky[t] = top
            rem[t] -= z
        for p in range(start[i] + 1, end[i]):
            cross[p] -= 1
        unplaced_bits[0] ^= 1 << i
        trail.append((i, level))

    def raise_to(lo: int, hi: int, height: int) -> bool:
        for t in range(lo, hi):
            if cap - rem[t] < height:
                return False
        trail.append((-1, lo, sky[lo:hi]))
        sky[lo:hi] = [height] * (hi - lo)
        return True

    def undo(mark: int) -> None:
        while len(trail) > mark:
            rec = trail.pop()
            i = rec[0]
            if i < 0:
                sky[rec[1] : rec[1] + len(rec[2])] = rec[2]
                continue
            placed[i] = False
            z, level = size[i], rec[1]
            for t in range(start[i], end[i]):
                rem[t] += z
                sky[t] = level
            for p in range(start[i] + 1, end[i]):
                cross[p] += 1
            unplaced_bits[0] ^= 1 << i

    def parts(lo: int, hi: int) -> list[tuple[int, int]]:
        """The independent parts of [lo, hi): runs of sections with unplaced buffers, cut where
        no unplaced buffer crosses."""
        out, t = [], lo
        while t < hi:
            if rem[t] == 0:
                t += 1
                continue
            a = t
            t += 1
            while t < hi and cross[t] > 0:
                t += 1
            out.append((a, t))
        return out

    def parts_after(region: tuple[int, int], i: int) -> list[tuple[int, int]]:
        """The parts of ``region`` after placing buffer ``i`` (-1: none) in it. A new cut can
        only open inside the buffer's span, so the whole region is rescanned only then."""
        if i >= 0:
            if any(rem[t] == 0 for t in range(start[i], end[i])) or any(
                cross[p] == 0 for p in range(start[i] + 1, end[i])
            ):
                return parts(*region)
        return [region]

    def scan_left(a: int, b: int, level: int, h_left: int, h_right: int, limit: int, out) -> int:
        """Count (and, given a list, collect) the buffers that can be the leftmost one at
        ``level`` in valley [a, b); stops counting at ``limit``."""
        count = 0
        tried = None
        room = _WALL  # least cap - rem over [a, s): how high the skipped sections may be raised
        for s in range(a, b):
            if s > a:
                r = cap - rem[s - 1]
                if r < room:
                    room = r
                    if room <= level:
                        break  # no section before s can take dead space
            for i in by_start[s]:
                if placed[i]:
                    continue
                e = end[i]
                if e > b:
                    continue
                if twins[i]:
                    if tried is None:
                        tried = set()
                    elif alike[i] in tried:
                        continue
                    tried.add(alike[i])
                al = align[i]
                off = level if al == 1 else -(-level // al) * al
                top = off + size[i]
                if off > level and not room_for(s, e, off):
                    continue
                dead = h_left if h_left < top else top
                if s > a and room < dead:
                    continue
                count += 1
                if out is not None:
                    if s > a:
                        score = (2, s)
                    else:  # prefer a snug fit: flush with the valley's end or a neighbour's top
                        score = (0, -((e == b) + (top == h_left) + (e == b and top == h_right)))
                    out.append((score, rank[i], i, level, off, a, s, dead))
            if count >= limit:
                break
        return count

    def scan_right(a: int, b: int, level: int, h_left: int, h_right: int, limit: int, out) -> int:
        """The mirror image of scan_left: the buffers that can be the rightmost one."""
        count = 0
        tried = None
        room = _WALL
        for e in range(b, a, -1):
            if e < b:
                r = cap - rem[e]
                if r < room:
                    room = r
                    if room <= level:
                        break
            for i in by_end[e]:
                if placed[i]:
                    continue
                s = start[i]
                if s < a:
                    continue
                if twins[i]:
                    if tried is None:
                        tried = set()
                    elif alike[i] in tried:
                        continue
                    tried.add(alike[i])
                al = align[i]
                off = level if al == 1 else -(-level // al) * al
                top = off + size[i]
                if off > level and not room_for(s, e, off):
                    continue
                dead = h_right if h_right < top else top
                if e < b and room < dead:
                    continue
                count += 1
                if out is not None:
                    if e < b:
                        score = (2, -e)
                    else:
                        score = (0, -((s == a) + (top == h_right) + (s == a and top == h_left)))
                    out.append((score, rank[i], i, level, off, e, b, dead))
            if count >= limit:
                break
        return count

    def room_for(lo: int, hi: int, height: int) -> bool:
        """Whether sections [lo, hi) can all be dead up to ``height``."""
        for t in range(lo, hi):
            if cap - rem[t] < height:
                return False
        return True

    # Branch order: snug buffers (score 0), then raising the valley and the buffers leaving dead
    # space before them (score 2) in either order.
    raise_score = (1, 0) if raise_first else (3, 0)
    scanners = {"l": (scan_left,), "r": (scan_right,)}
    scanners = scanners.get(sides) or (scanners[sides[0]] + scanners[sides[1]])

    def branches(lo: int, hi: int) -> list[tuple]:
        """The branches at the valley (and side) with the fewest of them: first fail."""
        best_count, best = _WALL, None
        t = lo
        while t < hi:
            level, a = sky[t], t
            t += 1
            while t < hi and sky[t] == level:
                t += 1
            h_left = sky[a - 1] if a > lo else _WALL
            h_right = sky[t] if t < hi else _WALL
            if h_left < level or h_right < level:
                continue  # not a valley
            # Raising the valley to its lower neighbour; between two walls a valley must hold
            # a buffer instead (its part has some).
            height = h_left if h_left < h_right else h_right
            can_raise = height < _WALL and room_for(a, t, height)
            for scan in scanners:
                count = can_raise + scan(a, t, level, h_left, h_right, best_count - can_raise, None)
                if count < best_count:
                    best_count, best = count, (scan, a, t, level, h_left, h_right, can_raise)
            if best_count <= 1:
                break
        scan, a, b, level, h_left, h_right, can_raise = best
        out: list[tuple] = []
        scan(a, b, level, h_left, h_right, _WALL, out)
        if can_raise:
            out.append((raise_score, 0, -1, 0, 0, a, b, min(h_left, h_right)))
        out.sort()
        return out

    def take(branch: tuple) -> bool:
        _, _, i, level, off, dead_lo, dead_hi, dead_height = branch
        if dead_lo < dead_hi and not raise_to(dead_lo, dead_hi, dead_height):
            return False
        if i >= 0:
            place(i, level, off)
        return True

    # Explicit stack instead of recursion: paths are as long as the number of buffers.
    # A frame: [trail mark, part, index of the frame that created the part, the agenda after
    # this part, branches, next branch, memo key].
    frames: list[list] = []
    agenda = [(part, -1) for part in parts(0, n)]
    nodes = 0

    def unwind_to(target: int) -> None:
        while len(frames) - 1 > target:
            undo(frames.pop()[0])

    while True:
        if not agenda:
            return SearchOutcome(offset, False, nodes)
        nodes += 1
        if nodes > node_limit or (nodes & 15 == 0 and time.monotonic() > deadline):
            return SearchOutcome(None, False, nodes)
        (lo, hi), creator = agenda[0]
        key = (lo, hi, unplaced_bits[0] & bits_within(lo, hi), tuple(sky[lo:hi]))
        if key in memo:
            if creator < 0:
                return SearchOutcome(None, True, nodes)
            unwind_to(creator)
        else:
            frames.append([len(trail), (lo, hi), creator, agenda[1:], branches(lo, hi), 0, key])
        while True:  # advance the top frame to its next viable branch, backjumping on failure
            frame = frames[-1]
            options = frame[4]
            taken = False
            while frame[5] < len(options):
                branch = options[frame[5]]
                frame[5] += 1
                undo(frame[0])
                if take(branch):
                    taken = True
                    break
            if taken:
                mine = len(frames) - 1
                agenda = [(part, mine) for part in parts_after(frame[1], branch[2])] + frame[3]
                break
            # Every branch failed, so the part fails whatever its sibling parts do: return to
            # the decision that made it a part of its own.
            memo.add(frame[6])
            undo(frame[0])
            frames.pop()
            if frame[2] < 0:
                return SearchOutcome(None, True, nodes)
            unwind_to(frame[2])
